"""Synthetic DFlash drafters for tests: z-lab layout Hugging Face checkpoints and matching `dflash` GGUFs."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from dflash_local.convert.gguf_target import read_target
from dflash_local.convert.hf import convert_hf_to_gguf

# small shapes without a target (reference tests); target-bound drafters take the target's shapes
SHAPES: dict[str, dict[str, Any]] = {
    "mha": dict(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, head_dim=16, n_ff=96, vocab_size=128,
                target_layer_ids=[0, 2], mask_token_id=127),
    "gqa": dict(n_embd=96, n_layer=2, n_head=6, n_head_kv=2, head_dim=32, n_ff=128, vocab_size=160,
                target_layer_ids=[1, 3, 5], mask_token_id=5),
    "mrope": dict(n_embd=64, n_layer=1, n_head=2, n_head_kv=1, head_dim=32, n_ff=64, vocab_size=96,
                  target_layer_ids=[1], mask_token_id=0, mrope=True),
}


def hf_tensors(*, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, n_ff: int,
               n_extract: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights named like z-lab's DFlashDraftModel, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def norm(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=gen)

    q, kv = n_head * head_dim, n_head_kv * head_dim
    t = {"fc.weight": mat(n_embd, n_extract * n_embd), "hidden_norm.weight": norm(n_embd), "norm.weight": norm(n_embd)}
    for i in range(n_layer):
        t |= {f"layers.{i}.{k}": v for k, v in {
            "input_layernorm.weight": norm(n_embd),
            "self_attn.q_proj.weight": mat(q, n_embd), "self_attn.k_proj.weight": mat(kv, n_embd),
            "self_attn.v_proj.weight": mat(kv, n_embd), "self_attn.o_proj.weight": mat(n_embd, q),
            "self_attn.q_norm.weight": norm(head_dim), "self_attn.k_norm.weight": norm(head_dim),
            "post_attention_layernorm.weight": norm(n_embd),
            "mlp.gate_proj.weight": mat(n_ff, n_embd), "mlp.up_proj.weight": mat(n_ff, n_embd),
            "mlp.down_proj.weight": mat(n_embd, n_ff),
        }.items()}
    return t


def write_hf_drafter(dir: Path, *, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, n_ff: int,
                     vocab_size: int, target_layer_ids: list[int], mask_token_id: int, block_size: int = 16,
                     seed: int = 0, mrope: bool = False) -> Path:
    """A z-lab layout checkpoint (config.json + model.safetensors) with random weights; returns dir.

    mrope: a qwen35-style config (rope_parameters with mrope_section) instead of a top-level rope_theta.
    """
    config: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_act": "silu",
        "hidden_size": n_embd, "num_hidden_layers": n_layer, "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv, "head_dim": head_dim, "intermediate_size": n_ff, "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "attention_bias": False, "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * n_layer, "use_sliding_window": False, "sliding_window": None,
        "dflash_config": {"target_layer_ids": target_layer_ids, "mask_token_id": mask_token_id,
                          "block_size": block_size},
    }
    if mrope:
        section = head_dim // 2
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000_000.0, "mrope_interleaved": True,
                                     "mrope_section": [section - 2 * (section // 3), section // 3, section // 3]}
    else:
        config |= {"rope_theta": 1_000_000.0, "rope_scaling": None}
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = hf_tensors(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                         n_ff=n_ff, n_extract=len(target_layer_ids), seed=seed)
    save_file(tensors, dir / "model.safetensors")
    return dir


def spread_layer_ids(n_layer: int, k: int = 3) -> list[int]:
    """Up to k HF target_layer_ids spread over the layers whose output llama.cpp keeps (0..n_layer-2)."""
    valid = range(n_layer - 1)
    k = min(k, len(valid))
    return sorted({valid[i * (len(valid) - 1) // max(k - 1, 1)] for i in range(k)})


def random_drafter_gguf(target_gguf: Path, out: Path, *, n_layer: int = 1, target_layer_ids: list[int] | None = None,
                        seed: int = 0, outtype: str = "f32") -> Path:
    """A random drafter shaped for the target GGUF (hidden size, heads, vocabulary, depth), converted to out."""
    t = read_target(target_gguf)
    ids = spread_layer_ids(t.n_layer) if target_layer_ids is None else target_layer_ids
    with tempfile.TemporaryDirectory() as tmp:
        src = write_hf_drafter(Path(tmp), n_embd=t.n_embd, n_layer=n_layer, n_head=t.n_head, n_head_kv=t.n_head_kv,
                               head_dim=t.head_dim, n_ff=2 * t.n_embd, vocab_size=t.n_vocab, target_layer_ids=ids,
                               mask_token_id=t.n_vocab - 1, seed=seed, mrope=t.mrope)
        return convert_hf_to_gguf(src, out, target_gguf, outtype)


def edit_gguf(src: Path, out: Path, keys: Mapping[str, tuple[Any, gguf.GGUFValueType]] = {}, drop: tuple[str, ...] = (),
              tensors: Callable[[dict[str, np.ndarray]], None] | None = None) -> Path:
    """A copy of a GGUF with keys set (name -> (value, type); arrays typed by their first element: int32, float32,
    string...), keys dropped and its tensors (name -> numpy array, of the file's type: f32 or f16) edited in place by
    `tensors`."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name not in drop and name not in keys and not name.startswith("GGUF.") and name != "general.architecture":
            vtype = field.types[0]
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1] if len(field.types) > 1 else None)
    for name, (value, vtype) in keys.items():
        sub_type = gguf.GGUFValueType.get_type(value[0]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub_type)
    data = {t.name: np.array(t.data) for t in r.tensors}
    if tensors:
        tensors(data)
    for name, array in data.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
