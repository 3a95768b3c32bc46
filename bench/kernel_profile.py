"""Where a DFlash step's time goes on an NVIDIA GPU (issue 24): each pass of a step, timed on the host and profiled
on the device (CUPTI, through torch.profiler), so that a pass's wall time splits into GPU time (the union of its
kernels and copies) and the rest (llama.cpp's or the helper's host work, launches, synchronizations, Python).

Passes, each repeated --repeats times after a warm-up, at --context positions of a made-up prompt, greedy picks in
the graph as the engine verifies:
- `target_alone_1`: one token in the target alone's context (no capture);
- `verify_k` for each k of --sizes: k tokens in DFlash's context, capturing the drafter's layers;
- `verify_k_no_capture`: the same with the capture off (its graph splits and synchronizations gone);
- `draft_k`: the drafter's block pass drafting k - 1 tokens; `inject_k`: its context pass over k rows.

Build llama.cpp without NCCL (CMAKE_ARGS=-DGGML_CUDA_NCCL=OFF): torch and llama.cpp's CUDA build each bring a
libnccl.so.2, which crashed a process that loaded both.

    python -P bench/kernel_profile.py TARGET DRAFTER [-ngl 99] [--device CUDA0] [--context 512] [--sizes 1,4,16]
        [--repeats 20] [--json OUT.json]
"""

from __future__ import annotations

import llama_cpp as lc  # first: numpy or torch loaded before llama.cpp's libraries crashed its model load on the GPUs

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dflash_local.bench.machine import file_info, script_header
from dflash_local.loader import open_drafter
from dflash_local.sampling import SamplingParams
from dflash_local.target import Target, TargetParams

TEXT = "def total(rows):\n    out = {}\n    for key, value in rows:\n        out[key] = out.get(key, 0) + value\n"
TOP = 12  # kernels listed per pass


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def profile(step: Callable[[], object], repeats: int, after: Callable[[], object] | None) -> dict:
    """Wall and GPU time of step (medians are not available on the device side: means over the repeats)."""
    import torch
    from torch.autograd import DeviceType

    for _ in range(3):  # warm-up: CUDA graphs need two calls of one shape before they are captured
        step()
        if after:
            after()
    torch.cuda.synchronize()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
            if after:
                after()
    gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = [e for e in gpu if not e.name.startswith("Memcpy") and not e.name.startswith("Memset")]
    by_name: Counter[str] = Counter()
    for e in kernels:
        by_name[e.name[:90]] += e.time_range.elapsed_us()
    return {
        "wall_ms": 1e3 * sum(walls) / repeats,
        "wall_min_ms": 1e3 * min(walls),
        "gpu_busy_ms": _busy_us([(e.time_range.start, e.time_range.end) for e in gpu]) / 1e3 / repeats,
        "kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / repeats,
        "kernels": len(kernels) / repeats,
        "copies": (len(gpu) - len(kernels)) / repeats,
        "top_kernels_ms": {name: us / 1e3 / repeats for name, us in by_name.most_common(TOP)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=99)
    ap.add_argument("--device", default="CUDA0", help="the drafter's ggml device")
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

    def undo(t: Target) -> Callable[[], object]:
        return lambda: t.rollback(pos, pos, [])

    passes: dict[str, dict] = {"target_alone_1": profile(verify(plain, 1), a.repeats, undo(plain))}
    for k in sizes:
        for name, on in ((f"verify_{k}", True), (f"verify_{k}_no_capture", False)):
            tg.capture.enable(on)
            passes[name] = profile(verify(tg, k), a.repeats, undo(tg))
        tg.capture.enable(True)
        tg.decode(block[:k], pos, all_logits=True)
        feats = tg.features().copy()
        undo(tg)()
        if k > 1:
            passes[f"draft_{k}"] = profile(lambda k=k: dr.draft(block[0], dr.info.block_size, k - 1), a.repeats, None)
        passes[f"inject_{k}"] = profile(lambda f=feats: dr.inject(f, pos), a.repeats, lambda: dr.crop(pos))

    import torch

    doc = {
        **script_header("dflash-kernel-profile/1"),
        "gpu": torch.cuda.get_device_name(0),
        "target": file_info(a.target),
        "drafter": file_info(a.drafter) | {"n_layer": dr.info.n_layer, "target_layers": list(dr.info.target_layers)},
        "settings": {"context": a.context, "sizes": sizes, "repeats": a.repeats, "n_gpu_layers": a.n_gpu_layers,
                     "device": a.device},
        "passes": passes,
    }
    print(f"{'pass':<24}{'wall ms':>9}{'GPU busy':>10}{'host/gaps':>11}{'kernels':>9}{'copies':>8}")
    for name, p in passes.items():
        print(f"{name:<24}{p['wall_ms']:9.3f}{p['gpu_busy_ms']:10.3f}{p['wall_ms'] - p['gpu_busy_ms']:11.3f}"
              f"{p['kernels']:9.0f}{p['copies']:8.1f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")
    plain.close()
    tg.close()
    dr.close()
    lc.llama_backend_free()


if __name__ == "__main__":
    main()
