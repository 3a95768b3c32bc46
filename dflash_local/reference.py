"""Torch reference of the DFlash v1 drafter: the oracle for the native helper and the model the trainer trains.

Parameter names follow the z-lab Hugging Face layout, so `state_dict()` is a checkpoint. The target's token
embedding and LM head are frozen, non-persistent buffers: never trained, never saved with the drafter.

Positions: the context holds target features for positions 0..T-1; a block anchored at `a` sits at positions
a..a+B-1 and attends, without a causal mask, to the context positions < a and to the whole block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dflash_local.convert.schema_check import Hparams


@dataclass(frozen=True)
class DrafterConfig(Hparams):
    """A drafter's hyperparameters (those of its GGUF) and the size of the vocabulary it shares with its target."""

    n_vocab: int = field(kw_only=True)


Rope = tuple[Tensor, Tensor]  # cos and sin [..., n_tok, 1, head_dim] of rope_tables


def rope_tables(pos: Tensor, head_dim: int, base: float) -> Rope:
    """NeoX RoPE's cos and sin at positions pos [..., n_tok], in float64 (exact angles at long positions): computed
    once per forward pass, for every layer."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim)
    ang = pos.to(torch.float64)[..., None, None] * inv_freq
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def rope(x: Tensor, tables: Rope) -> Tensor:
    """NeoX RoPE (rotate-half, full head) of x [..., n_tok, n_head, head_dim] by rope_tables of its positions."""
    cos, sin = (t.to(x.dtype) for t in tables)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its weight in the input's dtype: under autocast (bfloat16 input, float32 weight) torch's fused
    kernel takes only matching dtypes, and its composite fallback costs a training step a few kernels per norm."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        e, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        self.q_proj = nn.Linear(e, q, bias=False)
        self.k_proj = nn.Linear(e, kv, bias=False)
        self.v_proj = nn.Linear(e, kv, bias=False)
        self.o_proj = nn.Linear(q, e, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_eps)

    def kv(self, x: Tensor, pos: Rope) -> tuple[Tensor, Tensor]:
        """Roped keys and values [..., n_tok, n_head_kv, head_dim] of x [..., n_tok, n_embd] at pos (rope_tables)."""
        shape = (*x.shape[:-1], self.cfg.n_head_kv, self.cfg.head_dim)
        k = rope(self.k_norm(self.k_proj(x).view(shape)), pos)
        return k, self.v_proj(x).view(shape)

    def forward(self, x: Tensor, pos: Rope, k_ctx: Tensor, v_ctx: Tensor, visible: Tensor) -> Tensor:
        """For each of S sequences, blocks x [S, N, B, n_embd] at pos (rope_tables of [S, N, B]) attend to the
        sequence's context K/V [S, T, n_head_kv, head_dim] and to its blocks where visible [S, N * B, T + N * B] is
        true."""
        c = self.cfg
        s, n, b = x.shape[:3]
        q = rope(self.q_norm(self.q_proj(x).view(s, n, b, c.n_head, c.head_dim)), pos)
        k_blk, v_blk = self.kv(x, pos)
        # [S, head, token, head_dim], the context's tokens then the blocks'; GQA: q head h reads kv head h // group
        # (repeated here: a fused attention kernel takes the mask but not always the grouping)
        k, v = (torch.cat([ctx, blk.flatten(1, 2)], 1).transpose(1, 2).repeat_interleave(c.n_head // c.n_head_kv, 1)
                for ctx, blk in ((k_ctx, k_blk), (v_ctx, v_blk)))
        # one fused kernel: the scores of every block against its sequence's context are never stored
        out = nn.functional.scaled_dot_product_attention(q.flatten(1, 2).transpose(1, 2), k, v,
                                                         attn_mask=visible[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(s, n, b, c.n_head * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_ff, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_ff, bias=False)
        self.down_proj = nn.Linear(cfg.n_ff, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, eps=cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, eps=cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, pos: Rope, g: Tensor, ctx_pos: Rope, visible: Tensor) -> Tensor:
        k_ctx, v_ctx = self.self_attn.kv(g, ctx_pos)  # the context skips input_layernorm
        x = x + self.self_attn(self.input_layernorm(x), pos, k_ctx, v_ctx, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, tok_embd: Tensor, lm_head: Tensor):
        super().__init__()
        for name, t in (("tok_embd", tok_embd), ("lm_head", lm_head)):
            if tuple(t.shape) != (cfg.n_vocab, cfg.n_embd):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(cfg.n_vocab, cfg.n_embd)}")
        self.cfg = cfg
        self.fc = nn.Linear(cfg.n_extract * cfg.n_embd, cfg.n_embd, bias=False)
        self.hidden_norm = RMSNorm(cfg.n_embd, eps=cfg.rms_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.rms_eps)
        # buffers so that .to() moves them; non-persistent so that checkpoints leave them out
        self.register_buffer("tok_embd", tok_embd, persistent=False)
        self.register_buffer("lm_head", lm_head, persistent=False)

    def hidden_batch(self, features: Tensor, anchors: Tensor, block_tokens: Tensor) -> Tensor:
        """Final-normed hidden states [N, B, n_embd] of N blocks block_tokens [N, B] anchored at anchors [N],
        each seeing the context features [T, n_extract * n_embd] of positions < its anchor."""
        return self.hidden_seqs(features[None], anchors[None], block_tokens[None])[0]

    def hidden_seqs(self, features: Tensor, anchors: Tensor, block_tokens: Tensor) -> Tensor:
        """hidden_batch of S sequences at once: features [S, T, F], anchors [S, N], block_tokens [S, N, B] ->
        [S, N, B, n_embd]. Shorter sequences are padded at the end: rows at or past an anchor are never seen."""
        dev = features.device
        ctx_pos = torch.arange(features.shape[1], device=dev).expand(features.shape[:2])
        pos = anchors[..., None] + torch.arange(block_tokens.shape[2], device=dev)
        s, n, b = block_tokens.shape
        # a block's tokens see the context before its anchor and their own block, not the sequence's other blocks
        ctx_visible = (ctx_pos[:, None, :] < anchors[..., None])[:, :, None, :].expand(s, n, b, -1)
        own_block = torch.eye(n, dtype=torch.bool, device=dev)[:, None, :, None].expand(n, b, n, b)
        visible = torch.cat([ctx_visible, own_block.expand(s, n, b, n, b).flatten(3)], -1).flatten(1, 2)
        g = self.hidden_norm(self.fc(features))
        x = self.tok_embd[block_tokens]
        if self.cfg.embedding_scale is not None:
            x = x * self.cfg.embedding_scale
        pos_rope, ctx_rope = (rope_tables(p, self.cfg.head_dim, self.cfg.rope_base) for p in (pos, ctx_pos))
        for layer in self.layers:
            x = layer(x, pos_rope, g, ctx_rope, visible)
        return self.norm(x)

    def forward_batch(self, features: Tensor, anchors: Tensor, block_tokens: Tensor) -> Tensor:
        """Logits [N, B, n_vocab] of N blocks; see hidden_batch."""
        return self.hidden_batch(features, anchors, block_tokens) @ self.lm_head.T

    def forward(self, features: Tensor, block_tokens: Tensor) -> Tensor:
        """Logits [B, n_vocab] of one block block_tokens [B] following the whole context features [ctx, F]."""
        anchor = torch.tensor([features.shape[0]], device=features.device)
        return self.forward_batch(features, anchor, block_tokens[None])[0]


def parameter_shapes(cfg: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trained tensor (the checkpoint layout), computed without allocating memory."""
    with torch.device("meta"):
        embd = torch.empty(cfg.n_vocab, cfg.n_embd)
        return {k: tuple(v.shape) for k, v in Drafter(cfg, embd, embd).state_dict().items()}
