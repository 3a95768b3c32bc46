"""The GGUF side of the drafter format: the one writer and the reader (facts about the target: gguf_target).

Layout: upstream llama.cpp's architecture `dflash` (src/models/dflash.cpp). The drafter shares the target's
token embedding and output head instead of storing them, and carries a copy of the target's tokenizer.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from dflash_local.convert.gguf_target import (ARCH, ARRAY, INT32, MASK_KEY, OUTTYPES, Q, ConversionError, Reader,
                                              TargetInfo, atomic_path, field_value, read_gguf, read_target)
from dflash_local.reference import Drafter, DrafterConfig, parameter_shapes

# Hugging Face (z-lab) tensor names -> GGUF names
_GLOBAL_NAMES = {"fc.weight": "fc.weight", "hidden_norm.weight": "enc.output_norm.weight",
                 "norm.weight": "output_norm.weight"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# dflash.* keys that change the computation in ways this runtime does not implement: key -> harmless value test
_UNSUPPORTED_KEYS = {
    "attention.sliding_window": lambda v: v == 0,
    "logit_scale": lambda v: v == 1.0,
    "final_logit_softcapping": lambda v: v <= 0,
    "attention.value_scale": lambda v: v in (0.0, 1.0),
    "attention.scale": lambda v: v == 0.0,
    "hidden_activation": lambda v: v == "silu",
    "rope.scaling.type": lambda v: v == "none",
    "expert_count": lambda v: v == 0,
    "hyper_connection_count": lambda v: v == 0,
    "conv_kernel_size": lambda v: False,
    "conv_group_size": lambda v: False,
    "selector_rank": lambda v: False,
    "selector_top_k": lambda v: False,
}

_KNOWN_KEYS = {  # dflash.* keys the reader understands
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length", "attention.layer_norm_rms_epsilon",
    "rope.freq_base", "rope.dimension_count", "rope.dimension_sections", "target_layers", "block_size",
    "attention.causal", "embedding_scale", "vocab_size", *_UNSUPPORTED_KEYS,
}


def gguf_names(cfg: DrafterConfig) -> dict[str, str]:
    """Hugging Face name -> GGUF name of every drafter tensor."""
    names = dict(_GLOBAL_NAMES)
    for i in range(cfg.n_layer):
        names |= {f"layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in _LAYER_NAMES.items()}
    return names


def _dequantize(t: Any) -> np.ndarray:
    """A tensor of a GGUFReader as float32 in numpy (row-major) shape, whatever its type."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])


def target_embeddings(target_gguf: Path | str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's token embedding and output head [n_vocab, n_embd]; the head is the embedding when tied."""
    tensors = {t.name: t for t in read_gguf(target_gguf).tensors}
    embd = torch.tensor(_dequantize(tensors["token_embd.weight"]), dtype=dtype)
    out = tensors.get("output.weight")
    return embd, embd if out is None else torch.tensor(_dequantize(out), dtype=dtype)


def check_config(cfg: DrafterConfig) -> None:
    """Internal consistency of a drafter configuration."""
    if cfg.n_head % cfg.n_head_kv:
        raise ConversionError(f"n_head {cfg.n_head} is not a multiple of n_head_kv {cfg.n_head_kv}")
    if cfg.head_dim % 2:
        raise ConversionError(f"head_dim {cfg.head_dim} is odd: RoPE needs an even head size")
    if not cfg.target_layers or min(cfg.target_layers) < 1:
        raise ConversionError(f"target layers {list(cfg.target_layers)} (GGUF numbering, HF id + 1) must be >= 1")
    if not 0 <= cfg.mask_token_id < cfg.n_vocab:
        raise ConversionError(f"mask_token_id {cfg.mask_token_id} is outside the vocabulary (0..{cfg.n_vocab - 1})")
    if cfg.block_size < 1:
        raise ConversionError(f"block_size {cfg.block_size} must be >= 1")


def check_target(cfg: DrafterConfig, target: TargetInfo) -> None:
    """The drafter fits the target: shared embedding and head, usable feature layers. Its heads are its own (it
    never reads the target's attention): Qwen3.5-27B's drafter has heads of 128 against the target's 256."""
    name = target.path.name
    for what, mine, theirs in (("hidden size", cfg.n_embd, target.n_embd), ("vocabulary size", cfg.n_vocab,
                                                                            target.n_vocab)):
        if mine != theirs:
            raise ConversionError(f"drafter {what} {mine} differs from the target's ({theirs} in {name}): "
                                  f"this drafter was made for another target")
    bad = [layer - 1 for layer in cfg.target_layers if not 1 <= layer <= target.n_layer - 1]
    if bad:
        raise ConversionError(f"target_layer_ids {bad} are beyond the target: {name} has {target.n_layer} layers, "
                              f"usable ids are 0..{target.n_layer - 2} (llama.cpp trims the last layer's output)")


def check_tensors(cfg: DrafterConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Exactly the drafter's tensors (Hugging Face names), with the configured shapes and finite values."""
    shapes = parameter_shapes(cfg)
    if missing := sorted(shapes.keys() - tensors.keys()):
        raise ConversionError(f"missing tensors: {', '.join(missing)}")
    if extra := sorted(tensors.keys() - shapes.keys()):
        raise ConversionError(f"unexpected tensors (not part of a DFlash v1 drafter): {', '.join(extra)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ConversionError(f"tensor {name} has shape {list(tensors[name].shape)}, "
                                  f"the config implies {list(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise ConversionError(f"tensor {name} contains NaN or infinite values")


def _tensor_type(shape: tuple[int, ...], qtype: Q) -> Q:
    if len(shape) == 1:
        return Q.F32  # norms: tiny, and precision matters
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16  # rows that are not a whole number of quantization blocks
    return qtype


def drafter_writer(cfg: DrafterConfig, target: TargetInfo, file_type: int, *, context_length: int | None = None,
                   mrope: bool = False, name: str | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter holding a drafter's keys (section 4 of docs/design.md), its tensors still to add."""
    a = ARCH
    w = gguf.GGUFWriter(None, arch=a)
    if name:
        w.add_string("general.name", name)
    w.add_uint32("general.file_type", file_type)
    w.add_uint32(f"{a}.context_length", context_length or target.n_ctx)
    w.add_uint32(f"{a}.embedding_length", cfg.n_embd)
    w.add_uint32(f"{a}.block_count", cfg.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", cfg.n_ff)
    w.add_uint32(f"{a}.attention.head_count", cfg.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", cfg.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    w.add_float32(f"{a}.rope.freq_base", cfg.rope_base)
    w.add_bool(f"{a}.attention.causal", False)
    w.add_uint32(f"{a}.block_size", cfg.block_size)
    w.add_key_value(f"{a}.target_layers", list(cfg.target_layers), ARRAY, sub_type=INT32)
    if cfg.embedding_scale is not None:
        w.add_float32(f"{a}.embedding_scale", cfg.embedding_scale)
    if mrope or target.mrope:  # the drafter ropes on the temporal section only
        w.add_key_value(f"{a}.rope.dimension_sections", [cfg.head_dim // 2, 0, 0, 0], ARRAY, sub_type=INT32)
    for key, value, vtype, sub_type in target.tokenizer:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    w.add_uint32(MASK_KEY, cfg.mask_token_id)
    return w


def write_drafter_gguf(out: Path | str, cfg: DrafterConfig, tensors: Mapping[str, torch.Tensor], target: TargetInfo,
                       outtype: str = "f16", *, context_length: int | None = None, mrope: bool = False,
                       name: str | None = None, progress: bool = False) -> Path:
    """Validate, then write a `dflash` GGUF atomically (a temporary file renamed at the end).

    tensors: Hugging Face names (a reference.Drafter state_dict). The tokenizer comes from the target;
    M-RoPE sections are written when the checkpoint (`mrope`) or the target uses M-RoPE.
    """
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    qtype, file_type = OUTTYPES[outtype]
    check_config(cfg)
    check_target(cfg, target)
    check_tensors(cfg, tensors)

    w = drafter_writer(cfg, target, file_type, context_length=context_length, mrope=mrope, name=name)

    plan = [(gname, tensors[hf], _tensor_type(tuple(tensors[hf].shape), qtype))
            for hf, gname in gguf_names(cfg).items()]
    for gname, t, q in plan:
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, q))
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=q)

    out = Path(out)
    with atomic_path(out) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with Progress(console=Console(stderr=True), disable=not progress) as bar:
                task = bar.add_task(f"writing {out.name}", total=len(plan))
                for _, t, q in plan:
                    w.write_tensor_data(gguf.quants.quantize(t.detach().to("cpu", torch.float32).numpy(), q))
                    bar.advance(task)
        finally:
            w.close()
    return out


def _drafter_config(r: Reader, n_vocab: int) -> DrafterConfig:
    a = ARCH
    get = functools.partial(field_value, r)
    for key, harmless in _UNSUPPORTED_KEYS.items():
        if (v := get(f"{a}.{key}", None)) is not None and not harmless(v):
            raise ConversionError(f"{r.path}: {a}.{key} = {v!r} is a feature this runtime does not implement")
    for key in r.fields:
        if key.startswith(f"{a}.") and key[len(a) + 1:] not in _KNOWN_KEYS:
            warnings.warn(f"{r.path}: ignoring unknown key {key}", stacklevel=3)
    n_embd, n_head = get(f"{a}.embedding_length"), get(f"{a}.attention.head_count")
    head_dim = get(f"{a}.attention.key_length", n_embd // n_head)
    if {get(f"{a}.attention.value_length", head_dim), get(f"{a}.rope.dimension_count", head_dim)} != {head_dim}:
        raise ConversionError(f"{r.path}: value length or rotary dimensions differ from the head size {head_dim}")
    if get(f"{a}.attention.causal", False):
        raise ConversionError(f"{r.path}: causal attention inside the block is not implemented")
    sections = get(f"{a}.rope.dimension_sections", [])
    if any(sections) and list(sections) != [head_dim // 2, 0, 0, 0]:
        raise ConversionError(f"{r.path}: M-RoPE sections {sections}: only [{head_dim // 2}, 0, 0, 0] is implemented")
    return DrafterConfig(
        n_embd=n_embd, n_layer=get(f"{a}.block_count"), n_head=n_head,
        n_head_kv=get(f"{a}.attention.head_count_kv", n_head), head_dim=head_dim,
        n_ff=get(f"{a}.feed_forward_length"), n_vocab=n_vocab,
        rms_eps=get(f"{a}.attention.layer_norm_rms_epsilon"), rope_base=get(f"{a}.rope.freq_base", 10000.0),
        target_layers=tuple(get(f"{a}.target_layers")), mask_token_id=get(MASK_KEY),
        block_size=get(f"{a}.block_size", 16), embedding_scale=get(f"{a}.embedding_scale", None))


def load_drafter_gguf(drafter_gguf: Path | str, target_gguf: Path | str, dtype: torch.dtype = torch.float32) -> Drafter:
    """A reference Drafter from a `dflash` GGUF (ours or upstream's) and the target's embedding and head."""
    r = read_gguf(drafter_gguf)
    if (arch := field_value(r, "general.architecture")) != ARCH:
        raise ConversionError(f"{drafter_gguf}: architecture {arch!r}, expected {ARCH!r}")
    target = read_target(target_gguf)
    cfg = _drafter_config(r, target.n_vocab)
    check_config(cfg)
    check_target(cfg, target)
    names = gguf_names(cfg)
    stored = {t.name: t for t in r.tensors}
    if extra := sorted(stored.keys() - set(names.values())):
        raise ConversionError(f"{drafter_gguf}: tensors of features this runtime does not implement: "
                              f"{', '.join(extra)}")
    if missing := sorted(set(names.values()) - stored.keys()):
        raise ConversionError(f"{drafter_gguf}: missing tensors: {', '.join(missing)}")
    state = {hf: torch.tensor(_dequantize(stored[gname]), dtype=dtype) for hf, gname in names.items()}
    check_tensors(cfg, state)
    with torch.device("meta"):  # skip the random initialization: every parameter is assigned below
        drafter = Drafter(cfg, torch.empty(cfg.n_vocab, cfg.n_embd), torch.empty(cfg.n_vocab, cfg.n_embd))
    drafter.load_state_dict(state, assign=True)
    drafter.tok_embd, drafter.lm_head = target_embeddings(target_gguf, dtype)
    return drafter


def save_drafter_gguf(drafter: Drafter, out: Path | str, target_gguf: Path | str, outtype: str = "f16",
                      *, name: str | None = None, progress: bool = False) -> Path:
    """Write a reference Drafter (e.g. a trained one) as a `dflash` GGUF for the given target."""
    return write_drafter_gguf(out, drafter.cfg, drafter.state_dict(), read_target(target_gguf), outtype,
                              name=name, progress=progress)
