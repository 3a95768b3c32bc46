"""Mission-size targets and their DFlash drafters with random weights (issue 26), to measure what a pass costs on a
GPU without downloading the models: the shapes of the published configs, random Q4_K_M-like quantized blocks written
straight to the file (dflash_local/synthetic/), a synthetic vocabulary of the real size.

    python bench/shapes.py --shape qwen35-27b|qwen3-8b [--scale F] --out DIR [--quant q4_k_m|q8_0]
        [--drafter-type q8_0|q4_k|q6_k|f16] [--context-prompts 1024,8192,32768] [--seed 0] [--force] [--trial-bytes N]

writes DIR/<shape>[-xF].<QUANT>.gguf and, next to it, its drafter <same name>-dflash.gguf (which `dflash run` and
`dflash bench` find by that name). --quant: llama.cpp's Q4_K_M mix (default), or Q8_0 throughout, whose passes of
several tokens give exactly a one-token pass's logits on a CPU (K-quants do not), for greedy identity there. --scale
F < 1 shrinks layers, widths, head counts and vocabulary for a CPU test (a few MB at 0.05). --context-prompts writes prompts-ctx<N>.jsonl: 4 raw-completion prompts of N tokens each (one
token a word of the vocabulary), for `dflash bench --prompts` at that context. --trial-bytes N writes only the first
N bytes of the target's tensor data, reports the rate and the time the whole file would take, and removes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dflash_local.synthetic.drafters import DrafterShape, write_drafter
from dflash_local.synthetic.targets import QUANTS, Ssm, TargetShape, write_target
from dflash_local.synthetic.vocab import WORDS
from dflash_local.synthetic.weights import Q


@dataclass(frozen=True)
class Mission:
    target: TargetShape
    drafter: DrafterShape


# Q and K's scale in the mission shapes. The tiny models' 3 made the random 36-layer Qwen3-8B shape amplify rounding
# so much on an H100 that every prompt's text left the target alone's at its second token (and no emulated draft was
# accepted). On one CPU thread with Q4_K_M weights, a narrow 36-layer qwen3's pass of 16 tokens gave logits up to 5.7
# away from one-token passes' at 3, 0.47-0.69 at 1.5 (its text still varied: 13-14 distinct tokens of 16). A narrow
# 64-layer qwen35 stays sensitive at any gain (1.2-10.8 at 3, 1.9-5.3 at 1.5, 3.3-6.8 at 1): its Gated DeltaNet
# layers amplify too
QK_GAIN = 1.5
# Their short convolution's scale (Ssm.conv_gain says why it matters). The narrow 64-layer qwen35 at QK_GAIN, largest
# logit difference, median (max) over prompts 0-9 and 10-19: 3.9 (6.6), 3.0 (5.0) at 1; 1.5 (2.3), 2.1 (4.0) at 2;
# 1.1 (1.9), 1.3 (3.4) at 3; 1.5 (3.4) at 4 (prompts 10-19); its text still varied (15-16 distinct tokens of 16).
# With the Gated DeltaNet layers' output zeroed it is 1.8 (2.1), 1.2 (2.1): the rest is not theirs to amplify
SSM_CONV_GAIN = 3.0

DRAFTER_TYPES = {"q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K, "f16": Q.F16}  # --drafter-type
SHAPES = {
    # Qwen3.5-27B: Gated DeltaNet on 3 of every 4 layers (d_inner 6144 = 48 value heads of 128, 16 key heads),
    # full attention on the 4th; its DFlash drafter has heads of its own (32 of 128)
    "qwen35-27b": Mission(
        TargetShape("qwen35", n_layer=64, n_embd=5120, n_ff=17408, n_head=24, n_head_kv=4, head_dim=256,
                    n_vocab=248320, context_length=262144, rope_base=1e7, qk_gain=QK_GAIN,
                    ssm=Ssm(conv_kernel=4, state_size=128, group_count=16, time_step_rank=48,
                            conv_gain=SSM_CONV_GAIN)),
        DrafterShape(n_layer=5, n_head=32, n_head_kv=8, head_dim=128, n_ff=17408,
                     target_layers=(2, 17, 32, 47, 62), mask_token_id=248070)),  # HF ids 1, 16, 31, 46, 61
    # Qwen3-8B; the mask token is the first id after its tokenizer's 151,669 tokens, where <|MASK|> is added
    "qwen3-8b": Mission(
        TargetShape("qwen3", n_layer=36, n_embd=4096, n_ff=12288, n_head=32, n_head_kv=8, head_dim=128,
                    n_vocab=151936, context_length=40960, rope_base=1e6, qk_gain=QK_GAIN),
        DrafterShape(n_layer=5, n_head=32, n_head_kv=8, head_dim=128, n_ff=12288,
                     target_layers=(2, 10, 18, 26, 34), mask_token_id=151669)),  # HF ids 1, 9, 17, 25, 33
}
MIN_LAYERS = 4  # a scaled qwen35 keeps one full-attention layer in four
MIN_VOCAB = 1024


def scaled(m: Mission, f: float) -> Mission:
    """The shape shrunk by f: layer and head counts, widths (whole Q4_K blocks of 256) and vocabulary; head sizes,
    state size and the ratios of heads stay, target layers keep their relative depth."""
    if f == 1:
        return m
    t, d = m.target, m.drafter

    def width(x: int) -> int:
        return max(256, round(x * f / 256) * 256)

    def count(x: int) -> int:
        return max(1, round(x * f))

    step = t.full_attention_interval if t.arch == "qwen35" else 1
    n_layer = max(MIN_LAYERS, round(t.n_layer * f / step) * step)
    kv = count(t.n_head_kv)
    g = count(t.ssm.group_count)
    ssm = dataclasses.replace(t.ssm, group_count=g, time_step_rank=g * (t.ssm.time_step_rank // t.ssm.group_count))
    n_vocab = max(MIN_VOCAB, round(t.n_vocab * f))
    target = dataclasses.replace(t, n_layer=n_layer, n_embd=width(t.n_embd), n_ff=width(t.n_ff), n_head_kv=kv,
                                 n_head=kv * (t.n_head // t.n_head_kv), n_vocab=n_vocab, ssm=ssm)
    # HF ids 0 .. n_layer-2 (GGUF numbering one more) mapped onto the fewer layers
    ids = sorted({round((layer - 1) * (n_layer - 2) / (t.n_layer - 2)) + 1 for layer in d.target_layers})
    dkv = count(d.n_head_kv)
    drafter = dataclasses.replace(d, n_layer=count(d.n_layer), n_head_kv=dkv, n_head=dkv * (d.n_head // d.n_head_kv),
                                  n_ff=width(d.n_ff), target_layers=tuple(ids),
                                  mask_token_id=n_vocab - (t.n_vocab - d.mask_token_id))
    return Mission(target, drafter)


def context_prompts(n_tokens: int, count: int = 4, seed: int = 0) -> list[dict[str, object]]:
    """Raw-completion prompts of n_tokens tokens with the synthetic vocabulary: BOS, then random words (each one
    token)."""
    rng = np.random.default_rng([seed, n_tokens])
    return [{"id": f"ctx{n_tokens}/{i}", "prompt": " ".join(rng.choice(WORDS, n_tokens - 1)), "chat": False}
            for i in range(count)]


class _Trial(Exception):
    pass


def trial(path: Path, shape: TargetShape, quant: str, n_bytes: int, seed: int) -> None:
    """Write the first n_bytes of the target's tensor data, print the rate and the whole file's time; the partial
    file is removed as any interrupted write is."""
    seen = {}

    def stop(done: int, total: int) -> None:
        seen.update(done=done, total=total)
        if done >= n_bytes:
            raise _Trial

    t0 = time.perf_counter()
    try:
        write_target(path, shape, name=path.stem, seed=seed, quant=quant, on_bytes=stop)
    except _Trial:
        pass
    dt = time.perf_counter() - t0
    rate = seen["done"] / dt
    print(f"trial: {seen['done'] / 1e6:.0f} MB in {dt:.1f} s ({rate / 1e6:.0f} MB/s); the whole "
          f"{seen['total'] / 1e9:.2f} GB would take {seen['total'] / rate / 60:.1f} min", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the shape (CPU tests), e.g. 0.05")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quant", choices=sorted(QUANTS), default="q4_k_m", help="the target's weights")
    ap.add_argument("--drafter-type", choices=sorted(DRAFTER_TYPES), default="q8_0")
    ap.add_argument("--context-prompts", default="", help="comma-separated prompt lengths in tokens, e.g. 1024,8192")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write files that exist again")
    ap.add_argument("--trial-bytes", type=float, default=0, help="time the write of this many bytes, then stop")
    a = ap.parse_args()
    if not 0 < a.scale <= 1:
        ap.error("--scale must be in (0, 1]")

    m = scaled(SHAPES[a.shape], a.scale)
    name = a.shape if a.scale == 1 else f"{a.shape}-x{a.scale:g}"
    stem = f"{name}.{a.quant.upper()}"
    target, drafter = a.out / f"{stem}.gguf", a.out / f"{stem}-dflash.gguf"
    a.out.mkdir(parents=True, exist_ok=True)
    if a.trial_bytes:
        free = shutil.disk_usage(a.out).free
        if a.trial_bytes > free / 2:
            ap.error(f"--trial-bytes {a.trial_bytes:.0f} is more than half of the {free / 1e9:.1f} GB free")
        trial(a.out / f".trial-{stem}.gguf", m.target, a.quant, int(a.trial_bytes), a.seed)
        return
    print(f"target {m.target}\ndrafter {m.drafter}", flush=True)
    qtype = DRAFTER_TYPES[a.drafter_type]
    for path, write in ((target, lambda: write_target(target, m.target, name=f"random {stem}", seed=a.seed,
                                                      quant=a.quant, progress=True)),
                        (drafter, lambda: write_drafter(drafter, target, m.drafter, name=f"random {stem} DFlash",
                                                        qtype=qtype, seed=a.seed, progress=True))):
        if path.exists() and not a.force:
            print(f"kept {path} ({path.stat().st_size / 1e9:.2f} GB; --force writes it again)", flush=True)
            continue
        t0 = time.perf_counter()
        write()
        dt = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"wrote {path}: {size / 1e9:.3f} GB in {dt:.1f} s ({size / dt / 1e6:.0f} MB/s)", flush=True)
    for n in (int(x) for x in a.context_prompts.split(",") if x.strip()):
        if n >= m.target.context_length or n < 2:
            sys.exit(f"a prompt of {n} tokens does not fit the target's context of {m.target.context_length}")
        out = a.out / f"prompts-ctx{n}.jsonl"
        out.write_text("".join(json.dumps(p) + "\n" for p in context_prompts(n, seed=a.seed)))
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
