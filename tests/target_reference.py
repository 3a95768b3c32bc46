"""Independent float64 torch forward of a `llama`- or `qwen2`-arch GGUF target (written for the tiny targets).

For llama it undoes the converter's Q/K permutation to get Hugging Face weights back and runs the HF Llama
math (rotate-half RoPE), so agreeing with llama.cpp (interleaved NORM RoPE on the permuted weights)
checks both the GGUF layout and the arithmetic. qwen2's converter does not permute (llama.cpp ropes it in
NEOX mode, rotate-half too) and adds Q/K/V biases.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf.quants import dequantize
import numpy as np
import torch


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of the converter's Q/K `permute`: interleaved rope pairs back to HF's two halves."""
    return w.reshape(n_head, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _load(path: Path | str) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"the reference runs archs llama and qwen2 only, not {arch}")
    kv = {k.removeprefix(f"{arch}."): f.contents() for k, f in reader.fields.items()
          if k.startswith(f"{arch}.")}
    weights = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float64))
               for t in reader.tensors}
    weights.setdefault("output.weight", weights["token_embd.weight"])  # tied embeddings
    kv["arch"] = arch
    return kv, weights


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[n_tokens, n_head * head_dim] -> [n_head, n_tokens, head_dim]."""
    return x.view(x.shape[0], n_head, -1).transpose(0, 1)


def _forward(path: Path | str, tokens: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    kv, w = _load(path)
    n_head, n_head_kv = kv["attention.head_count"], kv["attention.head_count_kv"]
    eps = kv["attention.layer_norm_rms_epsilon"]
    n, n_embd = len(tokens), kv["embedding_length"]
    head_dim = kv.get("attention.key_length", n_embd // n_head)
    permuted = kv["arch"] == "llama"  # qwen2's Q and K are in HF's layout already

    def proj(x: torch.Tensor, p: str, name: str, n_heads: int | None = None) -> torch.Tensor:
        """x times attn_{name}, plus its bias where there is one; n_heads: Q or K, permuted by llama's converter."""
        weight, bias = w[f"{p}attn_{name}.weight"], w.get(f"{p}attn_{name}.bias")
        if n_heads is not None and permuted:
            weight = _unpermute(weight, n_heads)
        return x @ weight.T + (0 if bias is None else bias)

    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = kv["rope.freq_base"] ** -exponents
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)

    h = w["token_embd.weight"][torch.tensor(tokens)]
    states = [h]
    for il in range(kv["block_count"]):
        p = f"blk.{il}."
        x = _rms_norm(h, w[p + "attn_norm.weight"], eps)
        q = _heads(proj(x, p, "q", n_head), n_head)
        k = _heads(proj(x, p, "k", n_head_kv), n_head_kv)
        v = _heads(proj(x, p, "v"), n_head_kv)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = (t.repeat_interleave(n_head // n_head_kv, dim=0) for t in (k, v))  # GQA
        att = torch.softmax(q @ k.transpose(1, 2) / head_dim**0.5 + causal, dim=-1)
        h = h + (att @ v).transpose(0, 1).reshape(n, -1) @ w[p + "attn_output.weight"].T
        x = _rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate, up = x @ w[p + "ffn_gate.weight"].T, x @ w[p + "ffn_up.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "ffn_down.weight"].T
        states.append(h)
    logits = _rms_norm(h, w["output_norm.weight"], eps) @ w["output.weight"].T
    return [s.numpy() for s in states], logits.numpy()


def hidden_states(path: Path | str, tokens: list[int]) -> list[np.ndarray]:
    """HF-style hidden states for `tokens` at positions 0..n-1, each [n_tokens, n_embd] float64.

    Index 0 is the embeddings, index i the residual stream after decoder layer i-1. Unlike HF, the
    last entry is *before* the final norm (it is llama.cpp's `l_out` of the last layer).
    """
    return _forward(path, tokens)[0]


def logits(path: Path | str, tokens: list[int]) -> np.ndarray:
    """Logits for every position of `tokens`, [n_tokens, n_vocab] float64."""
    return _forward(path, tokens)[1]
