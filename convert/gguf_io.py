"""The GGUF side of the drafter format: the one writer and the reader (facts about the target: gguf_target), both by
the schema (keys, tensors and what is refused: schema; checked by schema_check).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from dflash_local.convert.gguf_target import (ARCH, MASK_KEY, OUTTYPES, Q, ConversionError, TargetInfo, read_gguf,
                                              read_target, write_gguf)
from dflash_local.convert.schema import KEYS_BY_NAME, WRITTEN_AS
from dflash_local.convert.schema_check import check_drafter, tensor_plan
from dflash_local.errors import UserError
from dflash_local.gguf_file import ARRAY, STRING, TensorInfo, Value, read_layout
from dflash_local.reference import Drafter, DrafterConfig, parameter_shapes


def gguf_names(cfg: DrafterConfig) -> dict[str, str]:
    """Hugging Face name -> GGUF name of every drafter tensor."""
    return {t.hf if i is None else f"layers.{i}.{t.hf}": gname for i, gname, t, _ in tensor_plan(cfg)}


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
    """The drafter fits the target: shared embedding and head, usable feature layers (its own heads may differ from the
    target's: Qwen3.5-27B's drafter has heads of 128 against the target's 256)."""
    name = target.path.name
    for what, mine, theirs in (("hidden size", cfg.n_embd, target.n_embd), ("vocabulary size", cfg.n_vocab, target.n_vocab)):
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
    """A GGUFWriter holding a drafter's keys (docs/design.md, section 4) and the target's tokenizer, its tensors still
    to add."""
    w = gguf.GGUFWriter(None, arch=ARCH)
    if name:
        w.add_string("general.name", name)
    w.add_uint32("general.file_type", file_type)
    for key, value in drafter_metadata(cfg, context_length or target.n_ctx, mrope or target.mrope).items():
        vtype, sub_type = WRITTEN_AS[KEYS_BY_NAME[key].kind]
        w.add_key_value(key, value, gguf.GGUFValueType(vtype), sub_type=sub_type and gguf.GGUFValueType(sub_type))
    for key, value, vtype, sub_type in target.tokenizer:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
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

    plan = [(gname, tensors[hf], _tensor_type(tuple(tensors[hf].shape), qtype))
            for hf, gname in gguf_names(cfg).items()]
    # what is written is what the reader takes: checked by the same rules before a byte is written
    values = drafter_metadata(cfg, context_length or target.n_ctx, mrope or target.mrope)
    check_drafter({key: _as_value(key, v) for key, v in values.items()} | {"general.architecture": Value(STRING, ARCH)},
                  {gname: TensorInfo(gname, tuple(reversed(t.shape)), q, 0, 0) for gname, t, q in plan}, str(out))

    w = drafter_writer(cfg, target, file_type, context_length=context_length, mrope=mrope, name=name)
    for gname, t, q in plan:
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, q))
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=q)
    data = (gguf.quants.quantize(t.detach().to("cpu", torch.float32).numpy(), q) for _, t, q in plan)
    return write_gguf(w, Path(out), data, len(plan), progress=progress)


def drafter_metadata(cfg: DrafterConfig, context_length: int, mrope: bool) -> dict[str, Any]:
    """The schema's keys a drafter of cfg is written with. mrope: the target uses M-RoPE, of which the drafter ropes
    the temporal section only."""
    a = ARCH
    values: dict[str, Any] = {
        f"{a}.context_length": context_length, f"{a}.embedding_length": cfg.n_embd, f"{a}.block_count": cfg.n_layer,
        f"{a}.feed_forward_length": cfg.n_ff, f"{a}.attention.head_count": cfg.n_head,
        f"{a}.attention.head_count_kv": cfg.n_head_kv, f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim, f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_eps,
        f"{a}.rope.freq_base": cfg.rope_base, f"{a}.attention.causal": False, f"{a}.block_size": cfg.block_size,
        f"{a}.target_layers": list(cfg.target_layers), MASK_KEY: cfg.mask_token_id,
    }
    if cfg.embedding_scale is not None:
        values[f"{a}.embedding_scale"] = cfg.embedding_scale
    if mrope:
        values[f"{a}.rope.dimension_sections"] = [cfg.head_dim // 2, 0, 0, 0]
    return values


def _as_value(key: str, value: Any) -> Value:
    """A value as the reader would find it in the file."""
    vtype, sub_type = WRITTEN_AS[KEYS_BY_NAME[key].kind]
    return Value(vtype, value, sub_type, len(value)) if vtype == ARRAY else Value(vtype, value)


def load_drafter_gguf(drafter_gguf: Path | str, target_gguf: Path | str, dtype: torch.dtype = torch.float32) -> Drafter:
    """A reference Drafter from a `dflash` GGUF (ours or upstream's) and the target's embedding and head."""
    try:
        layout = read_layout(drafter_gguf)
    except UserError as e:
        raise ConversionError(str(e)) from None
    hp = check_drafter(layout.fields, layout.tensors, str(drafter_gguf))
    target = read_target(target_gguf)
    cfg = DrafterConfig(**vars(hp), n_vocab=target.n_vocab)
    check_config(cfg)
    check_target(cfg, target)
    stored = {t.name: t for t in read_gguf(drafter_gguf).tensors}
    names = gguf_names(cfg)
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
