"""bench/train/torch_target.py, the target in torch that answers and computes features for training on a GPU:
against the float64 reference of the llama and qwen2 targets (qwen2: Q/K/V biases, NEOX RoPE), and its KV-cached
batched answers against greedy decoding without a cache, one prompt at a time."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import target_reference
from dflash_local.train.trainer import decode_features

sys.path.insert(0, str(Path(__file__).parents[1] / "bench" / "train"))
import torch_target  # noqa: E402
from torch_target import TorchTarget  # noqa: E402

LAYERS = (1, 3, 4)
ARCHS = ("llama", "qwen2")


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_and_features_match_the_reference(tiny_target: Callable[..., Path], arch: str) -> None:
    path = tiny_target(arch)
    seqs = [np.random.default_rng(i).integers(0, 200, size=n) for i, n in enumerate((23, 9))]
    want = [target_reference.hidden_states(path, s.tolist()) for s in seqs]  # index L: GGUF layer L
    tt = TorchTarget(path, torch.device("cpu"))
    _, states = tt.run(torch.from_numpy(seqs[0])[None], torch.arange(len(seqs[0]))[None], keep=LAYERS)
    for layer, got in zip(LAYERS, states, strict=True):
        ref = torch.from_numpy(want[0][layer])
        assert ((got[0].double() - ref).norm() / ref.norm()) < 1e-5
    # features: both sequences in one padded batch, rows back to back, float8 with a scale per row and layer
    codes, scales = tt.features(seqs, LAYERS)
    got = decode_features(codes, scales).view(-1, len(LAYERS), 64).double()
    ref = torch.cat([torch.from_numpy(np.stack([w[layer] for layer in LAYERS], 1)) for w in want])
    assert got.shape == ref.shape
    assert ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.05  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("arch,prefill_tokens", [("llama", 1 << 16), ("qwen2", 1 << 16), ("qwen2", 12)])
def test_batched_answers_equal_greedy_decoding_one_at_a_time(tiny_target: Callable[..., Path], arch: str,
                                                             prefill_tokens: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # prefill_tokens 12: each prompt's prefill a pass of its own (the 1-token one takes the cache's one-token path)
    monkeypatch.setattr(torch_target, "PREFILL_TOKENS", prefill_tokens)
    tt = TorchTarget(tiny_target(arch), torch.device("cpu"))
    prompts = [np.random.default_rng(i).integers(0, 200, size=n).tolist() for i, n in enumerate((5, 12, 1))]

    def greedy(prompt: list[int], n: int) -> list[int]:  # whole sequence each token, no cache, no padding
        seq = list(prompt)
        for _ in range(n):
            h, _ = tt.run(torch.tensor([seq]), torch.arange(len(seq))[None])
            seq.append(int(tt._next(h[0, -1])))
        return seq[len(prompt):]

    want = [greedy(p, 10) for p in prompts]
    eog = want[0][4]  # cuts the first answer, and any other where it comes
    want = [w[:w.index(eog)] if eog in w else w for w in want]
    assert tt.answer(prompts, 10, [eog]) == want
