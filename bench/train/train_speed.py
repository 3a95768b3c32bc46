"""Training-step speed of dflash_local.train.trainer for a SmolLM2-135M-shaped drafter on synthetic data
(random tokens and features: step time does not depend on the values; needs torch and gguf, not llama.cpp).

    python bench/train/train_speed.py cuda 2x8x32 5x16x32     # LAYERSxSEQUENCESxANCHORS per step
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dflash_local.reference import Drafter, DrafterConfig
from dflash_local.train.data import Dataset
from dflash_local.train.trainer import Trainer, TrainOptions

LAYERS = (2, 8, 15, 22, 28)  # auto for a 30-layer target


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    dev = torch.device(sys.argv[1])
    root = Path(tempfile.mkdtemp())
    target = root / "target.gguf"  # the dataset records the target's name and size only
    target.write_bytes(b"x")
    ds = Dataset(root / "data", target, LAYERS, 576)
    rng = np.random.default_rng(0)
    for i in range(48):  # prompts of 60 tokens, answers of 256 (the default --max-new-tokens)
        n = 60 + 256
        ds.append(str(i), str(i), rng.integers(0, 49152, n).tolist(), 60)
        ds.append_features(rng.integers(0, 126, (n, ds.width), np.uint8), np.ones((n, len(LAYERS)), np.float32))
    n_steps = 5 if dev.type == "cpu" else 30
    for spec in sys.argv[2:]:
        n_layer, batch, anchors = map(int, spec.split("x"))
        torch.manual_seed(0)
        cfg = DrafterConfig(n_embd=576, n_layer=n_layer, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536,
                            n_vocab=49152, rms_eps=1e-5, rope_base=1e5, target_layers=LAYERS, mask_token_id=0)
        embd = torch.randn(49152, 576) * 0.05
        tr = Trainer(Drafter(cfg, embd, embd).to(dev), ds, TrainOptions(steps=1000, batch=batch, anchors=anchors), dev)
        for _ in range(3):  # warm-up
            tr.step(tr.sample())
        sync(dev)
        t = time.perf_counter()
        for _ in range(n_steps):
            tr.step(tr.sample())
        sync(dev)
        dt = (time.perf_counter() - t) / n_steps
        t = time.perf_counter()
        for _ in range(n_steps):
            tr.sample()
        dt_sample = (time.perf_counter() - t) / n_steps
        print(f"{dev} layers={n_layer} batch={batch} anchors={anchors}: {1 / dt:.2f} steps/s, "
              f"{batch * anchors / dt:.0f} blocks/s (sampling {dt_sample * 1000:.1f} ms/step)", flush=True)


if __name__ == "__main__":
    main()
