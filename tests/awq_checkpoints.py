"""Tiny random AutoAWQ checkpoints (4-bit GEMM) of llama, qwen2 and qwen3, written in AutoAWQ's exact layout.

The packer follows AutoAWQ's own `WQLinear_GEMM.from_linear` loop (column order_map[i] into bits 4*i..4*i+3 of each
int32), written independently of convert/awq.py's vectorized unpacker, so that the two cannot share a mistake. The
tokenizer is a small byte-level BPE tokenizer.json written by hand (the `tokenizers` package is not installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file

# AutoAWQ's awq/modules/linear/gemm.py, from_linear: `order_map = [0, 2, 4, 6, 1, 3, 5, 7]`
_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
_WORDS = "the of and to in is it that for on with as was he she they be at by this have from fox dog little".split()
SPECIAL = "<|endoftext|>"
ADDED = {SPECIAL: True, "<tool_call>": False}  # added tokens -> special


class Spec(NamedTuple):
    arch: str
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    group_size: int
    tied: bool
    n_layer: int = 2
    rope_scaling: dict[str, Any] | None = None


# Llama 3.1's RoPE scaling with an original context of 64, so that positions of a short prompt see all three
# kinds of dimensions (unscaled, scaled by `factor`, interpolated)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
SPECS = {  # name -> shapes
    "llama": Spec("llama", 128, 4, 2, 32, 256, 128, tied=False),
    "llama3": Spec("llama", 128, 4, 2, 32, 256, 128, tied=False, rope_scaling=LLAMA3_ROPE),
    "qwen2": Spec("qwen2", 64, 4, 2, 16, 192, 32, tied=False),
    "qwen3": Spec("qwen3", 64, 4, 2, 32, 192, 64, tied=True),
}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_QK_GAIN, _EMBD_STD = 3.0, 0.1  # as tests/tiny_targets.py: sharp attention, context-driven predictions


def awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing of int codes [rows, cols] into int32 [rows, cols / 8], its loops as written."""
    pack_num = 8
    packed = torch.zeros((intweight.shape[0], intweight.shape[1] // pack_num), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        for i in range(pack_num):
            packed[:, col] |= intweight[:, col * pack_num + _ORDER_MAP[i]].to(torch.int32) << (i * 4)
    return packed


class AwqLayer(NamedTuple):
    """One random AWQ linear layer: its packed tensors and the weights AutoAWQ dequantizes them to."""

    qweight: torch.Tensor  # int32 [in, out / 8]
    qzeros: torch.Tensor  # int32 [in / group, out / 8]
    scales: torch.Tensor  # float16 [in / group, out]
    weight: np.ndarray  # float32 [out, in]: (q - z) * s, transposed to nn.Linear's orientation
    offset: np.ndarray  # float32 [out, in]: z * s, whose float16 rounding is Q4_1's only loss


def random_awq_layer(gen: torch.Generator, n_out: int, n_in: int, group: int, gain: float = 1.0) -> AwqLayer:
    codes = torch.randint(0, 16, (n_in, n_out), generator=gen)
    zeros = torch.randint(0, 16, (n_in // group, n_out), generator=gen)
    # (q - z) has std ~6.5: scales that give weights of std gain / sqrt(n_in), varied per group and column
    scales = (gain / (6.5 * n_in**0.5) * (0.5 + torch.rand(n_in // group, n_out, generator=gen))).half()
    rep = lambda t: t.repeat_interleave(group, dim=0).float()  # noqa: E731
    weight = ((codes.float() - rep(zeros)) * rep(scales)).T.contiguous().numpy()
    offset = (rep(zeros) * rep(scales)).T.contiguous().numpy()
    return AwqLayer(awq_pack(codes), awq_pack(zeros), scales, weight, offset)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer.json: the 256 bytes, merges building ' word' for a few words, two added tokens.
    Returns the number of tokens."""
    byte_chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte_chars.values())}
    merges: list[list[str]] = []
    for word in _WORDS:
        piece = byte_chars[ord(" ")]
        for ch in word:
            merges.append([piece, ch])
            piece += ch
            vocab.setdefault(piece, len(vocab))
    merges = list(map(list, dict.fromkeys(map(tuple, merges))))
    added = [{"id": len(vocab) + i, "content": text, "special": special, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False} for i, (text, special) in enumerate(ADDED.items())]
    tokenizer = {"version": "1.0", "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                   "use_regex": True},
                 "post_processor": None, "decoder": {"type": "ByteLevel"},
                 "model": {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": False,
                           "dropout": None, "unk_token": None}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": SPECIAL, "bos_token": SPECIAL,
                                                              "add_bos_token": False}))
    return len(vocab) + len(ADDED)


def quantization_config(group_size: int, **changes: Any) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True,
            **changes}


def write_awq_checkpoint(folder: Path, name: str, *, seed: int = 0) -> tuple[Path, dict[str, AwqLayer]]:
    """A random AWQ checkpoint of SPECS[name]; returns the folder and its quantized linear layers by HF module name
    (`model.layers.0.self_attn.q_proj`)."""
    s = SPECS[name]
    arch = s.arch
    folder.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tokenizer(folder)
    n_vocab = n_tokens + 7  # a few rows more than tokens, as real checkpoints pad vocab_size
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, AwqLayer] = {}

    def norm(name: str, n: int, scale: float = 1.0) -> None:
        tensors[name] = (scale * (1 + 0.1 * torch.randn(n, generator=gen))).half()

    def linear(name: str, n_out: int, n_in: int, gain: float = 1.0, bias: bool = False) -> None:
        layer = random_awq_layer(gen, n_out, n_in, s.group_size, gain)
        tensors.update({f"{name}.{part}": getattr(layer, part) for part in ("qweight", "qzeros", "scales")})
        layers[name] = layer
        if bias:
            tensors[f"{name}.bias"] = (0.1 * torch.randn(n_out, generator=gen)).half()

    qk_norm = arch == "qwen3"
    qk_gain = 1.0 if qk_norm else _QK_GAIN
    n_q, n_kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    tensors["model.embed_tokens.weight"] = (_EMBD_STD * torch.randn(n_vocab, s.n_embd, generator=gen)).half()
    for i in range(s.n_layer):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm.weight", s.n_embd)
        linear(p + "self_attn.q_proj", n_q, s.n_embd, qk_gain, bias=arch == "qwen2")
        linear(p + "self_attn.k_proj", n_kv, s.n_embd, qk_gain, bias=arch == "qwen2")
        linear(p + "self_attn.v_proj", n_kv, s.n_embd, bias=arch == "qwen2")
        linear(p + "self_attn.o_proj", s.n_embd, n_q)
        if qk_norm:
            norm(p + "self_attn.q_norm.weight", s.head_dim, _QK_GAIN)
            norm(p + "self_attn.k_norm.weight", s.head_dim, _QK_GAIN)
        norm(p + "post_attention_layernorm.weight", s.n_embd)
        linear(p + "mlp.gate_proj", s.n_ff, s.n_embd)
        linear(p + "mlp.up_proj", s.n_ff, s.n_embd)
        linear(p + "mlp.down_proj", s.n_embd, s.n_ff)
    # logits of std ~4: from the head, or for tied embeddings from the final norm's scale
    norm("model.norm.weight", s.n_embd, 4.0 / (_EMBD_STD * s.n_embd**0.5) if s.tied else 1.0)
    if not s.tied:
        tensors["lm_head.weight"] = (4.0 / s.n_embd**0.5 * torch.randn(n_vocab, s.n_embd, generator=gen)).half()
    save_file(tensors, folder / "model.safetensors")

    config = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch, "hidden_act": "silu", "hidden_size": s.n_embd, "intermediate_size": s.n_ff,
        "num_hidden_layers": s.n_layer, "num_attention_heads": s.n_head, "num_key_value_heads": s.n_head_kv,
        "head_dim": s.head_dim, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": s.rope_scaling, "vocab_size": n_vocab, "tie_word_embeddings": s.tied, "torch_dtype": "float16",
        "bos_token_id": n_tokens - len(ADDED), "eos_token_id": n_tokens - len(ADDED),
        "quantization_config": quantization_config(s.group_size),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, layers
