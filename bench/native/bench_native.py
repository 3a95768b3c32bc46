"""Native-helper micro-benchmark: per decoding step,
- the hidden-state capture's cost as a fraction of a target verification pass of BLOCK tokens
  (goal <= 3 %): the same pass in a context without the eval callback, with the callback installed but
  switched off (as the engine replays tokens the drafter has seen), and capturing;
- the drafter's block pass against that target pass (goal <= 15 %).
Modes alternate within each iteration so drift hits them alike; medians are reported.

    PYTHONPATH=. python bench/native/bench_native.py TARGET.gguf DRAFTER.gguf [--block 16] [--iters 40]
        [--threads N] [--n-gpu-layers N] [--device CUDA0] [--json bench/results/native-....json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from dflash_local.bench.machine import file_info, script_header
from dflash_local.bench.report import write_json
from dflash_local.native import Drafter
from dflash_local.target import Target, TargetParams

GOALS = {"capture_overhead": 0.03, "drafter_vs_target": 0.15}
PROMPT = ("Write a Python function that parses a CSV file of transactions, groups them by month and "
          "returns the total amount per month, with type hints, a docstring and unit tests. ") * 3


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--device", default=None, help="the drafter's ggml device")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    params = TargetParams(n_ctx=1024, n_gpu_layers=a.n_gpu_layers, n_threads=a.threads)
    dr = Drafter(a.drafter, a.target, n_ctx=params.n_ctx + 64, device=a.device, n_threads=a.threads)
    cap = Target(a.target, params, capture_layers=dr.info.target_layers, rollback=dr.info.block_size)
    plain = Target(a.target, params)
    prompt = cap.tokenize(PROMPT)
    pos = len(prompt)
    block = prompt[-a.block:]  # any tokens do: the cost of a pass does not depend on them
    for tg in (cap, plain):
        tg.decode(prompt, 0, all_logits=False)
    dr.inject(cap.features(), 0)
    anchor = prompt[-1]

    def verify(tg: Target) -> None:
        tg.decode(block, pos, all_logits=True)
        tg.rollback(pos, pos, [])

    def with_capture(on: bool) -> None:
        cap.capture.enable(on)
        verify(cap)

    modes = {
        "verify_no_callback": lambda: verify(plain),
        "verify_callback_off": lambda: with_capture(False),
        "verify_capture": lambda: with_capture(True),
        "target_1_token": lambda: (plain.decode(block[:1], pos, all_logits=True), plain.rollback(pos, pos, [])),
        "draft": lambda: dr.draft(anchor, a.block),
    }
    samples: dict[str, list[float]] = {k: [] for k in modes}
    copy_s = 0.0
    for it in range(a.warmup + a.iters):
        s0 = cap.capture.seconds
        for name, fn in modes.items():
            ms = _ms(fn)
            if it >= a.warmup:
                samples[name].append(ms)
        if it >= a.warmup:
            copy_s += cap.capture.seconds - s0
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["verify_no_callback"]
    results = {
        "median_ms": med,
        "capture_overhead": (med["verify_capture"] - base) / base,
        "callback_off_overhead": (med["verify_callback_off"] - base) / base,
        "capture_copy_ms": 1e3 * copy_s / a.iters,  # the helper's own copy time, inside verify_capture
        "drafter_vs_target": med["draft"] / base,
    }
    goals = {k: {"goal": g, "value": results[k], "met": results[k] <= g} for k, g in GOALS.items()}
    doc = {
        **script_header("dflash-bench-native/1"),
        "target": file_info(a.target),
        "drafter": file_info(a.drafter) | {"n_layer": dr.info.n_layer, "target_layers": list(dr.info.target_layers)},
        "settings": {"block": a.block, "iters": a.iters, "warmup": a.warmup, "context_tokens": pos,
                     "threads": a.threads, "n_gpu_layers": a.n_gpu_layers, "device": a.device},
        "results": results,
        "goals": goals,
        "samples_ms": samples,
    }
    for name, ms in med.items():
        print(f"{name:22s} {ms:8.2f} ms")
    print(f"capture overhead       {results['capture_overhead']:+8.1%} of a {a.block}-token verification "
          f"(goal <= {GOALS['capture_overhead']:.0%}: {'met' if goals['capture_overhead']['met'] else 'NOT met'})")
    print(f"callback switched off  {results['callback_off_overhead']:+8.1%}")
    print(f"drafter pass           {results['drafter_vs_target']:8.1%} of a target pass "
          f"(goal <= {GOALS['drafter_vs_target']:.0%}: {'met' if goals['drafter_vs_target']['met'] else 'NOT met'})")
    if a.json:
        write_json(doc, a.json)
        print(f"wrote {a.json}")
    for obj in (cap, plain, dr):
        obj.close()


if __name__ == "__main__":
    main()
