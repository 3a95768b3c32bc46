"""A GGUF target in torch (`llama` arch: SmolLM2; `qwen2`: Qwen2.5-Coder), for training data on a GPU where
llama.cpp has no CUDA build (bench/train/gpu_train.py): the target's greedy answers to many prompts at once with a KV
cache, and its hidden states at the drafter's layers as the float8 codes and scales that native.Capture.rows_e4m3
gives.

The weights are the GGUF's, dequantized. RoPE turns adjacent pairs for `llama`, as llama.cpp's NORM mode does on the
converter's permuted Q/K (tests/target_reference.py undoes the permutation instead), and the two halves of each head
for `qwen2`, as llama.cpp's NEOX mode does (its converter does not permute); `qwen2` adds biases to Q, K and V. How
close this comes to llama.cpp's answers and features: bench/HISTORY.md (2026-11-28) and bench/train/README.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf.quants import dequantize
from torch import Tensor

from dflash_local.train.trainer import encode_features

NEOX = {"llama": False, "qwen2": True}  # the archs this runs: whether RoPE turns halves (NEOX) or adjacent pairs
PREFILL_TOKENS = 1 << 16  # padded prompt tokens per forward pass of answer's prefill: Qwen2.5-Coder-1.5B's FFN
#                           activations take 2.3 GB each in float32 at this size


class TorchTarget:
    def __init__(self, path: Path, device: torch.device):
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        if arch not in NEOX:
            raise ValueError(f"the torch target runs archs {', '.join(NEOX)}, not {arch}")
        self.neox = NEOX[arch]
        kv = {k.removeprefix(f"{arch}."): f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.")}
        self.n_layer, self.n_embd = kv["block_count"], kv["embedding_length"]
        self.n_head, self.n_head_kv = kv["attention.head_count"], kv["attention.head_count_kv"]
        self.head_dim = kv.get("attention.key_length", self.n_embd // self.n_head)
        self.eps = kv["attention.layer_norm_rms_epsilon"]
        # on threads: numpy's dequantization runs mostly without the GIL, and 1.5B weights take some 25 s on one core
        with ThreadPoolExecutor() as pool:
            self.w = dict(pool.map(lambda t: (t.name, torch.from_numpy(
                dequantize(t.data, t.tensor_type).astype(np.float32)).to(device)), reader.tensors))
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied embeddings
        self.device = device
        pairs = torch.arange(self.head_dim // 2, dtype=torch.float64, device=device)
        self.inv_freq = kv.get("rope.freq_base", 10000.0) ** (-2 * pairs / self.head_dim)

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """x [S, H, T, D] at positions pos [S, T]: each pair (2i, 2i+1), or (i, i + D/2) for NEOX, turned by
        pos * inv_freq[i]."""
        angle = (pos[:, None, :, None] * self.inv_freq).to(x.dtype)
        cos, sin = angle.cos(), angle.sin()
        if self.neox:
            a, b = x.chunk(2, -1)
            return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)

    def _attention(self, il: int, x: Tensor, pos: Tensor, cache: list[tuple[Tensor, Tensor]] | None,
                   rows: slice) -> Tensor:
        """Self-attention of layer il over x [S, T, n_embd]. Without cache, or with T > 1 (prompts from position 0,
        whose keys go to the cache's rows), whole sequences from position 0, padded at the end: causal is all it
        takes. With T == 1, one new token per sequence at pos [S, 1], against the cache's rows up to it."""
        s, t, _ = x.shape
        p = f"blk.{il}."

        def heads(name: str, n: int) -> Tensor:
            y = x @ self.w[f"{p}attn_{name}.weight"].T
            if (bias := self.w.get(f"{p}attn_{name}.bias")) is not None:
                y = y + bias
            return y.view(s, t, n, self.head_dim).transpose(1, 2)

        q, k, v = heads("q", self.n_head), heads("k", self.n_head_kv), heads("v", self.n_head_kv)
        q, k = self._rope(q, pos), self._rope(k, pos)
        group = self.n_head // self.n_head_kv  # query head h reads key/value head h // group
        if t > 1 or cache is None:
            if cache is not None:
                cache[il][0][rows, :, :t], cache[il][1][rows, :, :t] = k, v
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = cache[il][0][rows], cache[il][1][rows]  # views: writing them writes the cache
            seqs = torch.arange(s, device=x.device)
            keys[seqs, :, pos[:, 0]], values[seqs, :, pos[:, 0]] = k[:, :, 0], v[:, :, 0]
            seen = (torch.arange(keys.shape[2], device=x.device) <= pos)[:, None, None, :]
            out = F.scaled_dot_product_attention(q.view(s, self.n_head_kv, group, self.head_dim), keys, values,
                                                 attn_mask=seen)
        return out.reshape(s, self.n_head, t, self.head_dim).transpose(1, 2).reshape(s, t, -1)

    def run(self, tokens: Tensor, pos: Tensor, cache: list[tuple[Tensor, Tensor]] | None = None,
            keep: tuple[int, ...] = (), rows: slice = slice(None), depth: int | None = None
            ) -> tuple[Tensor, list[Tensor]]:
        """The output of layer depth - 1 (default: the last) [S, T, n_embd] for tokens [S, T] at pos [S, T], and the
        hidden states of GGUF layers keep (llama.cpp's l_out-(L-1): the residual stream after layer L-1). A prompt
        pass (T > 1) with a cache writes the cache's rows."""
        w, h, states = self.w, self.w["token_embd.weight"][tokens], []
        for il in range(depth or self.n_layer):
            p = f"blk.{il}."
            x = F.rms_norm(h, (self.n_embd,), w[p + "attn_norm.weight"], self.eps)
            h = h + self._attention(il, x, pos, cache, rows) @ w[p + "attn_output.weight"].T
            x = F.rms_norm(h, (self.n_embd,), w[p + "ffn_norm.weight"], self.eps)
            h = h + (F.silu(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)) @ w[
                p + "ffn_down.weight"].T
            if il + 1 in keep:
                states.append(h)
        return h, states

    def _padded(self, sequences: list[list[int]] | list[np.ndarray]) -> Tensor:
        """Token sequences [S, longest] on the device, zeros after each one's end, which no real token attends to."""
        tokens = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long, device=self.device)
        for i, s in enumerate(sequences):
            tokens[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        return tokens

    def _next(self, h: Tensor) -> Tensor:
        """Greedy tokens after last-layer outputs h [S, n_embd]."""
        return (F.rms_norm(h, (self.n_embd,), self.w["output_norm.weight"], self.eps) @ self.w["output.weight"].T
                ).argmax(-1)

    @torch.no_grad()
    def answer(self, prompts: list[list[int]], max_new_tokens: int, eog: list[int]) -> list[list[int]]:
        """Greedy answers to prompts, all in one batch, each until an end-of-generation token (left off) or
        max_new_tokens, as dflash_local.train.answers.answer writes them."""
        n = torch.tensor([len(p) for p in prompts], device=self.device)
        tokens = self._padded(prompts)
        cache = [tuple(torch.zeros(len(prompts), self.n_head_kv, tokens.shape[1] + max_new_tokens, self.head_dim,
                                   device=self.device) for _ in range(2)) for _ in range(self.n_layer)]
        first = []
        step = max(1, PREFILL_TOKENS // tokens.shape[1])
        for i in range(0, len(prompts), step):  # the prompts a few at a time: a wide FFN's activations are large
            rows = slice(i, i + step)
            width = int(n[rows].max())
            h, _ = self.run(tokens[rows, :width], torch.arange(width, device=self.device).expand(len(n[rows]), -1),
                            cache, rows=rows)
            first.append(self._next(h[torch.arange(len(n[rows])), n[rows] - 1]))
        out = [torch.cat(first)]
        eog_t = torch.tensor(eog, device=self.device)
        for i in range(1, max_new_tokens):
            if i % 16 == 0 and torch.isin(torch.stack(out), eog_t).any(0).all():  # reading waits for the GPU
                break
            h, _ = self.run(out[-1][:, None], (n + i - 1)[:, None], cache)
            out.append(self._next(h[:, 0]))
        answers = []
        for row in torch.stack(out, 1).tolist():
            ends = [j for j, t in enumerate(row) if t in eog]
            answers.append(row[:ends[0]] if ends else row)
        return answers

    @torch.no_grad()
    def features(self, sequences: list[np.ndarray], layers: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Codes [rows, len(layers) * n_embd] (uint8: float8 e4m3) and scales [rows, len(layers)] of the sequences'
        hidden states at GGUF layers, rows back to back, as native.Capture.rows_e4m3 gives them, in one batch."""
        tokens = self._padded(sequences)
        _, states = self.run(tokens, torch.arange(tokens.shape[1], device=self.device).expand_as(tokens), keep=layers,
                             depth=max(layers))  # the layers above the last one kept add nothing
        x = torch.stack(states, 2)  # [S, T, layers, n_embd]
        return encode_features(torch.cat([x[i, :len(s)] for i, s in enumerate(sequences)]))
