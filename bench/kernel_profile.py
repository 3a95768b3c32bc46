"""Where a DFlash step's time goes on an NVIDIA GPU (issue 24): each pass of a step timed on the host, and its
kernels' GPU time from Nsight Compute, so that a pass's wall time splits into the GPU's work (its kernels run one by
one) and the rest (launch gaps, llama.cpp's or the helper's host work, synchronizations, Python).

Passes, each repeated --repeats times after a warm-up, at --context positions of a made-up prompt, greedy picks in
the graph as the engine verifies:
- `target_alone_1`: one token in the target alone's context (no capture);
- `verify_k` for each k of --sizes: k tokens in DFlash's context, capturing the drafter's layers;
- `verify_k_no_capture`: the same with the capture off (its graph splits and synchronizations gone);
- `draft_k`: the drafter's block pass drafting k - 1 tokens; `inject_k`: its context pass over k rows.

Run alone, it times each pass (`wall_ms`). With --ncu, it runs itself under `ncu` once per pass, profiling only
that pass's repeats (between cuProfilerStart and cuProfilerStop), and adds each pass's kernel count, the sum
of its kernels' durations (`kernel_ms`) and its costliest kernels. torch's profiler is not used: it segfaulted in a
process beside llama.cpp's CUDA build.

    python -P bench/kernel_profile.py TARGET DRAFTER [-ngl 99] [--device CUDA0] [--context 512] [--sizes 1,4,16]
        [--repeats 10] [--ncu] [--json OUT.json]
"""

from __future__ import annotations

import llama_cpp as lc  # first: numpy or torch loaded before llama.cpp's libraries crashed its model load on the GPUs

import argparse
import csv
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dflash_local.bench.machine import file_info, script_header
from dflash_local.bench.report import write_json
from dflash_local.loader import open_drafter
from dflash_local.sampling import SamplingParams
from dflash_local.target import Target, TargetParams

TEXT = "def total(rows):\n    out = {}\n    for key, value in rows:\n        out[key] = out.get(key, 0) + value\n"
TOP = 12  # kernels listed per pass


def _cuda_driver() -> ctypes.CDLL:
    """The CUDA driver, for cuProfilerStart/Stop (the range ncu profiles with --profile-from-start off)."""
    return ctypes.CDLL("libcuda.so.1")


def time_pass(step: Callable[[], object], repeats: int, after: Callable[[], object] | None,
              profiled: bool) -> dict:
    """Mean and best wall time of step; with profiled, its repeats (not the warm-up) inside a profiler range."""
    for _ in range(3):  # warm-up: CUDA graphs are captured after two calls of one shape
        step()
        if after:
            after()
    walls = []
    rt = _cuda_driver() if profiled else None
    if rt:
        rt.cuProfilerStart()
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
        if after:
            after()
    if rt:
        rt.cuProfilerStop()
    return {"wall_ms": 1e3 * sum(walls) / repeats, "wall_min_ms": 1e3 * min(walls)}


def ncu_kernels(argv: list[str], name: str, repeats: int) -> dict:
    """Run this script under ncu for pass `name` only; its kernels' count and summed durations per repeat."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "k.csv"
        cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--cache-control", "none",
               "--metrics", "gpu__time_duration.sum", "--csv", "--log-file",
               str(csv_path), sys.executable, "-P", __file__, *argv, "--only", name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [r for r in csv.DictReader(l for l in csv_path.read_text().splitlines() if l.startswith('"'))
                if r.get("Metric Name") == "gpu__time_duration.sum"]
    scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}
    by_name: Counter[str] = Counter()
    for r in rows:
        by_name[r["Kernel Name"][:90]] += float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
    return {"kernels": len(rows) / repeats, "kernel_ms": sum(by_name.values()) / repeats,
            "top_kernels_ms": {k: v / repeats for k, v in by_name.most_common(TOP)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=99)
    ap.add_argument("--device", default="CUDA0", help="the drafter's ggml device")
    ap.add_argument("--ncu", action="store_true", help="add each pass's kernels, profiled by Nsight Compute")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # the pass profiled in an ncu child
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sizes = sorted({int(k) for k in a.sizes.split(",")})
    params = TargetParams(n_ctx=-(-(a.context + 2 * max(sizes)) // 256) * 256, n_gpu_layers=a.n_gpu_layers)

    dr = open_drafter(a.drafter, a.target, params, a.device)
    tg = Target(a.target, params, capture_layers=dr.info.target_layers, rollback=dr.info.block_size)
    plain = Target(a.target, params, model_of=tg)
    tokens = (tg.tokenize(TEXT, add_special=False) or [1]) * (params.n_ctx // 8 + 8)
    prompt, block = tokens[:a.context], tokens[a.context:a.context + max(sizes)]
    pos = a.context
    for t in (plain, tg):
        t.pick_on_device(SamplingParams())
        t.decode(prompt, 0, all_logits=False)
    dr.inject(tg.features(), 0)

    def verify(t: Target, k: int) -> Callable[[], object]:
        def run() -> None:
            t.decode(block[:k], pos, all_logits=True)
            t.picks(k)  # reads the ids: the pass has finished

        return run

    def verify_no_capture(k: int) -> Callable[[], object]:
        def run() -> None:
            with tg.capture.paused():
                verify(tg, k)()

        return run

    def undo(t: Target) -> Callable[[], object]:
        return lambda: t.rollback(pos, pos, [])

    runs: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
        "target_alone_1": (verify(plain, 1), undo(plain))}
    for k in sizes:
        runs[f"verify_{k}"] = (verify(tg, k), undo(tg))
        runs[f"verify_{k}_no_capture"] = (verify_no_capture(k), undo(tg))
        tg.decode(block[:k], pos, all_logits=True)
        feats = tg.features().copy()
        undo(tg)()
        if k > 1:
            runs[f"draft_{k}"] = (lambda k=k: dr.draft(block[0], dr.info.block_size, k - 1), None)
        runs[f"inject_{k}"] = (lambda f=feats: dr.inject(f, pos), lambda: dr.crop(pos))

    if a.only:  # an ncu child: this pass only, its repeats in the profiler's range
        step, after = runs[a.only]
        time_pass(step, a.repeats, after, profiled=True)
        return
    passes = {name: time_pass(step, a.repeats, after, profiled=False) for name, (step, after) in runs.items()}
    doc = {
        **script_header("dflash-kernel-profile/1"),
        "target": file_info(a.target),
        "drafter": file_info(a.drafter) | {"n_layer": dr.info.n_layer, "target_layers": list(dr.info.target_layers)},
        "settings": {"context": a.context, "sizes": sizes, "repeats": a.repeats, "n_gpu_layers": a.n_gpu_layers,
                     "device": a.device},
        "passes": passes,
    }
    plain.close()  # before tg, whose model it uses; the ncu children load their own
    tg.close()
    dr.close()
    if a.ncu:
        argv = [str(a.target), str(a.drafter), "--context", str(a.context), "--sizes", a.sizes, "--repeats",
                str(a.repeats), "-ngl", str(a.n_gpu_layers), "--device", a.device]
        for name in passes:
            passes[name] |= ncu_kernels(argv, name, a.repeats)
            print(name, json.dumps(passes[name]), flush=True)
    print(f"{'pass':<26}{'wall ms':>9}{'best':>8}{'kernels ms':>12}{'rest ms':>9}{'kernels':>9}")
    for name, r in passes.items():
        k = r.get("kernel_ms")
        print(f"{name:<26}{r['wall_ms']:9.3f}{r['wall_min_ms']:8.3f}" + (
            f"{k:12.3f}{r['wall_ms'] - k:9.3f}{r['kernels']:9.0f}" if k is not None else ""))
    if a.json:
        write_json(doc, a.json)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
