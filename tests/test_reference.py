"""The torch reference drafter: layout, math against a naive implementation, batching, masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from synthetic_drafters import SHAPES, hf_tensors

from dflash_local.reference import Drafter, DrafterConfig, parameter_shapes


def make_drafter(shape: str, dtype: torch.dtype = torch.float64, seed: int = 0, **changes) -> Drafter:
    s = SHAPES[shape]
    cfg = DrafterConfig(n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"], n_head_kv=s["n_head_kv"],
                        head_dim=s["head_dim"], n_ff=s["n_ff"], n_vocab=s["vocab_size"], rms_eps=1e-6,
                        rope_base=10000.0, target_layers=tuple(i + 1 for i in s["target_layer_ids"]),
                        mask_token_id=s["mask_token_id"], **changes)
    gen = torch.Generator().manual_seed(seed + 1)
    tok_embd = torch.randn(cfg.n_vocab, cfg.n_embd, generator=gen)
    lm_head = torch.randn(cfg.n_vocab, cfg.n_embd, generator=gen) / cfg.n_embd**0.5
    drafter = Drafter(cfg, tok_embd, lm_head)
    drafter.load_state_dict(hf_tensors(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                       n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim, n_ff=cfg.n_ff,
                                       n_extract=cfg.n_extract, seed=seed))
    return drafter.to(dtype)


def inputs(d: Drafter, n_ctx: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_ctx, d.cfg.n_extract * d.cfg.n_embd, generator=gen, dtype=torch.float64)
    block = torch.full((d.cfg.block_size,), d.cfg.mask_token_id)
    block[0] = torch.randint(d.cfg.n_vocab, (), generator=gen)
    return features.to(d.fc.weight.dtype), block


def naive_logits(d: Drafter, features: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """One block, written out head by head from the spec (docs/dflash.md section 2)."""
    c, w = d.cfg, d.state_dict()
    n_ctx, n_blk, half = features.shape[0], block.shape[0], c.head_dim // 2

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_eps) * weight

    def rot(x, pos):  # x [n_tok, head_dim]: pairs (i, i + half) rotated by pos * base^(-2i/head_dim)
        theta = pos[:, None].double() * c.rope_base ** (-2 * torch.arange(half).double() / c.head_dim)
        cos, sin, a, b = theta.cos(), theta.sin(), x[:, :half], x[:, half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], 1)

    g = rms(features @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = d.tok_embd[block] * (c.embedding_scale or 1.0)
    ctx_pos, blk_pos = torch.arange(n_ctx), torch.arange(n_ctx, n_ctx + n_blk)
    for i in range(c.n_layer):
        p = lambda name: w[f"layers.{i}.{name}.weight"]  # noqa: E731
        h = rms(x, p("input_layernorm"))
        heads = []
        for head in range(c.n_head):
            kv = head // (c.n_head // c.n_head_kv)
            qs, ks = slice(head * c.head_dim, (head + 1) * c.head_dim), slice(kv * c.head_dim, (kv + 1) * c.head_dim)
            q = rot(rms(h @ p("self_attn.q_proj")[qs].T, p("self_attn.q_norm")), blk_pos)
            k = torch.cat([rot(rms(src @ p("self_attn.k_proj")[ks].T, p("self_attn.k_norm")), pos)
                           for src, pos in ((g, ctx_pos), (h, blk_pos))])
            v = torch.cat([g @ p("self_attn.v_proj")[ks].T, h @ p("self_attn.v_proj")[ks].T])
            heads.append(torch.softmax(q @ k.T / math.sqrt(c.head_dim), -1) @ v)
        x = x + torch.cat(heads, 1) @ p("self_attn.o_proj").T
        h = rms(x, p("post_attention_layernorm"))
        x = x + (torch.nn.functional.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms(x, w["norm.weight"]) @ d.lm_head.T


@pytest.mark.parametrize("shape", list(SHAPES))
def test_layout_is_zlab(shape):
    d = make_drafter(shape)
    s = SHAPES[shape]
    expected = hf_tensors(n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"], n_head_kv=s["n_head_kv"],
                          head_dim=s["head_dim"], n_ff=s["n_ff"], n_extract=len(s["target_layer_ids"]))
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert parameter_shapes(d.cfg) == {k: tuple(v.shape) for k, v in expected.items()}
    assert {name for name, _ in d.named_buffers()} == {"tok_embd", "lm_head"}  # frozen, not in the checkpoint


@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_matches_naive_implementation(shape):
    d = make_drafter(shape)
    features, block = inputs(d, n_ctx=7)
    torch.testing.assert_close(d(features, block), naive_logits(d, features, block), rtol=1e-10, atol=1e-10)


def test_embedding_scale():
    d = make_drafter("gqa", embedding_scale=2.5)
    features, block = inputs(d, n_ctx=5)
    torch.testing.assert_close(d(features, block), naive_logits(d, features, block), rtol=1e-10, atol=1e-10)
    plain = make_drafter("gqa")
    plain.tok_embd = d.tok_embd * 2.5
    torch.testing.assert_close(d(features, block), plain(features, block), rtol=1e-12, atol=1e-12)


def test_forward_batch_equals_per_block_forward():
    d = make_drafter("gqa")
    features, _ = inputs(d, n_ctx=11)
    anchors = torch.tensor([0, 3, 7, 11, 5])
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(d.cfg.n_vocab, (len(anchors), 6), generator=gen)
    batched = d.forward_batch(features, anchors, blocks)
    for n, a in enumerate(anchors.tolist()):
        torch.testing.assert_close(batched[n], d(features[:a], blocks[n]), rtol=1e-12, atol=1e-12)


def test_padded_sequences_equal_each_sequence_alone():
    from dflash_local.train.trainer import pad_stack

    d = make_drafter("gqa")
    gen = torch.Generator().manual_seed(5)
    seqs = [(inputs(d, n_ctx=n)[0].numpy(), np.array(a),
             torch.randint(d.cfg.n_vocab, (len(a), 6), generator=gen).numpy())
            for n, a in ((9, [2, 9]), (5, [0, 4, 5]))]
    packed = d.hidden_seqs(*(torch.from_numpy(pad_stack([s[k] for s in seqs], 0)) for k in range(3)))
    for i, (f, a, b) in enumerate(seqs):
        alone = d.hidden_batch(*map(torch.from_numpy, (f, a, b)))
        torch.testing.assert_close(packed[i, :len(a)], alone, rtol=1e-12, atol=1e-12)


def test_block_sees_its_prefix_and_whole_block():
    d = make_drafter("mha")
    features, block = inputs(d, n_ctx=9)
    anchors, blocks = torch.tensor([4]), block[None]
    base = d.forward_batch(features, anchors, blocks)
    later = features.clone()
    later[4:] += 1.0  # positions at or after the anchor are invisible to the block
    torch.testing.assert_close(d.forward_batch(later, anchors, blocks), base, rtol=0, atol=0)
    earlier = features.clone()
    earlier[3] += 1.0
    assert not torch.allclose(d.forward_batch(earlier, anchors, blocks), base)
    changed = blocks.clone()
    changed[0, -1] = (changed[0, -1] + 1) % d.cfg.n_vocab  # non-causal: the first position sees the last token
    assert not torch.allclose(d.forward_batch(features, anchors, changed)[0, 0], base[0, 0])


def test_float32_close_to_float64():
    d64 = make_drafter("gqa")
    d32 = make_drafter("gqa", dtype=torch.float32)
    features, block = inputs(d64, n_ctx=6)
    torch.testing.assert_close(d32(features.float(), block).double(), d64(features, block), rtol=1e-4, atol=1e-4)


def test_trainable_parameters_exclude_target_tensors():
    d = make_drafter("mrope", dtype=torch.float32)
    features, block = inputs(d, n_ctx=4)
    d(features, block).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in d.parameters())
    assert d.tok_embd.grad is None and d.lm_head.grad is None
