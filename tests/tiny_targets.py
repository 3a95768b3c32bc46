"""Tiny random-weight GGUF targets that llama.cpp loads and runs, one per supported architecture.

Every target shares one small SentencePiece-style vocabulary (`VOCAB`, 508 tokens), so their token ids agree.
Weights are f32, random normal, deterministic for a seed (dflash_local/synthetic/targets.py lays them out).
"""

from __future__ import annotations

from pathlib import Path

from dflash_local.synthetic.targets import ARCHS, GEMMA3_SWA, Ssm, TargetShape, write_target
from dflash_local.synthetic.vocab import BOS_ID, EOS_ID, MASK_ID, N_BASE, UNK_ID, VOCAB

__all__ = ["ARCHS", "BOS_ID", "EOS_ID", "GEMMA3_SWA", "MASK_ID", "N_VOCAB", "UNK_ID", "VOCAB", "write_tiny_target"]

N_VOCAB = N_BASE
# Per-arch defaults: head_dim decoupled from n_embd / n_head where the real models do it too, and
# tied embeddings (no `output.weight`) where the real small models tie them.
_HEAD_DIM = {"qwen3": 32, "gemma3": 32, "qwen35": 32}
_TIED = {"llama": False, "qwen2": False, "qwen3": True, "gemma3": True, "qwen35": False}
# qwen35 Gated-DeltaNet: 2 key heads and 4 value heads of 16; every 4th layer is full attention
QWEN35_SSM = Ssm(conv_kernel=4, state_size=16, group_count=2, time_step_rank=4)


def write_tiny_target(
    arch: str,
    path: Path,
    *,
    seed: int = 0,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_ff: int | None = None,
    tied: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a tiny random target of `arch` (one of ARCHS) to `path` and return `path`.

    `head_dim` defaults to 32 for qwen3, gemma3 and qwen35, else to n_embd // n_head (llama and
    qwen2 require that); `tied` defaults per arch (_TIED); `n_ff` defaults to 3 * n_embd; no chat
    template unless one is given.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    shape = TargetShape(arch, n_layer, n_embd, n_ff or 3 * n_embd, n_head, n_head_kv,
                        head_dim or _HEAD_DIM.get(arch, n_embd // n_head),
                        tied=_TIED[arch] if tied is None else tied, ssm=QWEN35_SSM)
    return write_target(Path(path), shape, name=f"tiny-{arch}-s{seed}", seed=seed, chat_template=chat_template)
