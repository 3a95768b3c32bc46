"""The drafter's block pass against the length of its context: the drafter attends over every position injected
before the block, so its pass grows with the context (issue 26: DFlash at 1k, 8k, 32k tokens). Random features go
in, in chunks of 512 rows, up to each --contexts length; then a greedy draft of a whole block is timed there (median of
--repeats after one warm-up).

    python -P bench/drafter_context.py TARGET DRAFTER [--contexts 64,1024,4096,8192] [--repeats 7] [--threads N]
        [--device CUDA0] [--json OUT.json]
"""

from __future__ import annotations

import llama_cpp  # noqa: F401  first: numpy loaded before llama.cpp's libraries crashed its model load on GPU machines

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from dflash_local.bench.machine import file_info, script_header
from dflash_local.bench.report import write_json
from dflash_local.native import Drafter

CHUNK = 512  # rows a feature injection takes at a time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--contexts", default="64,1024,4096,8192")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", "-t", type=int, default=0)
    ap.add_argument("--device", default=None, help="the drafter's ggml device")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    contexts = sorted({int(c) for c in a.contexts.split(",")})
    # room for a block after the longest context (drafters' blocks are 16 tokens; 64 is plenty)
    dr = Drafter(a.drafter, a.target, n_ctx=contexts[-1] + 64, device=a.device, n_threads=a.threads)
    width = len(dr.info.target_layers) * dr.info.n_embd
    rng = np.random.default_rng(0)
    ms: dict[str, float] = {}
    for n in contexts:
        while dr.n_pos < n:
            rows = min(CHUNK, n - dr.n_pos)
            dr.inject(rng.standard_normal((rows, width), dtype=np.float32), dr.n_pos)
        times = []
        for _ in range(a.repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            dr.draft(1)
            times.append(1e3 * (time.perf_counter() - t))
        ms[str(n)] = statistics.median(times[1:])
        print(f"context {n:6d}: drafter pass {ms[str(n)]:8.2f} ms", flush=True)
    dr.close()
    if a.json:
        write_json(script_header("dflash-drafter-context/1") | {
            "target": file_info(a.target), "drafter": file_info(a.drafter),
            "settings": {"repeats": a.repeats, "threads": a.threads, "device": a.device or "CPU"},
            "draft_ms_by_context": ms}, a.json)


if __name__ == "__main__":
    main()
