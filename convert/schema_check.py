"""A `dflash` GGUF's keys and tensors checked against the schema in Python: by the converter's reader, and by
`dflash run` before the C++ loader, which checks the same (native/schema.cpp) for callers that skip this.

The rules beyond the schema's tables, the same in both checkers:
- the head size is attention.key_length, else embedding_length / head_count, which must then divide; it is even
  (RoPE rotates pairs), and head_count is a multiple of head_count_kv;
- attention.value_length and rope.dimension_count, when present, equal the head size;
- rope.dimension_sections, when present, are all 0 or [head size / 2, 0, 0, 0] (an M-RoPE target's temporal
  section alone: plain NeoX RoPE on the position);
- exactly the schema's tensors for block_count layers, of the shapes the keys give and the types the schema allows.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dflash_local.convert.schema import (ARCH, DEFAULT_BLOCK_SIZE, GLOBAL_TENSORS, KEYS, KEYS_BY_NAME, LAYER_TENSORS,
                                         MASK_KEY, MATRIX_TYPES, NORM_TYPES, Dim, GGMLType, Key, Kind, Tensor)
from dflash_local.errors import ConversionError
from dflash_local.gguf_file import ARRAY, BOOL, FLOATS, INTEGERS, STRING, TensorInfo, Value

_KIND_TYPES = {Kind.INT: INTEGERS, Kind.FLOAT: FLOATS, Kind.BOOL: {BOOL}, Kind.STRING: {STRING}}
_LAYER_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,9})\.(.+)")
_LAYER_TENSOR_NAMES = {t.name for t in LAYER_TENSORS}
_GLOBAL_TENSOR_NAMES = {t.name for t in GLOBAL_TENSORS}


@dataclass(frozen=True)
class Hparams:
    """A drafter's hyperparameters, as its keys give them (defaults applied)."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float
    rope_base: float
    target_layers: tuple[int, ...]  # GGUF convention: HF target_layer_ids + 1 (input of llama.cpp layer L)
    mask_token_id: int
    block_size: int = DEFAULT_BLOCK_SIZE
    embedding_scale: float | None = None

    @property
    def n_extract(self) -> int:
        return len(self.target_layers)


Shape = tuple[int, ...]  # ggml order


def check_drafter(fields: Mapping[str, Value], tensors: Mapping[str, TensorInfo], where: str) -> Hparams:
    """The hyperparameters of a drafter whose keys and tensors (by name; their shape and type count) follow the
    schema; else ConversionError naming the key or tensor, prefixed with where (the file)."""
    hp = _hparams(check_keys(fields, where), where)
    _check_tensors(hp, tensors, where)
    return hp


def check_keys(fields: Mapping[str, Value], where: str) -> dict[str, Any]:
    """The values of the schema's keys; unknown `dflash.*` keys, refused features, missing required keys, values of
    the wrong type or out of range are errors."""
    arch = fields.get("general.architecture")
    if arch is None or arch.type != STRING or arch.value != ARCH:
        found = "none" if arch is None else repr(arch.value)
        raise ConversionError(f"{where} is not a DFlash drafter (architecture {found}, expected '{ARCH}')")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = KEYS_BY_NAME.get(name)
        if key is None:
            if name.startswith(f"{ARCH}."):
                raise ConversionError(f"{where}: unknown key {name}: not part of the dflash format this runtime "
                                      "reads (a drafter of a newer format?): update dflash-local, or use a drafter "
                                      "converted by `dflash convert drafter`")
            continue
        values[name] = _value(key, field, where)
        if key.refused and values[name] not in key.harmless:
            raise ConversionError(f"{where}: {name} = {values[name]!r} configures {key.refused}, which this "
                                  "runtime does not implement: use a drafter made without it")
    if missing := [k.name for k in KEYS if k.required and k.name not in values]:
        raise ConversionError(f"{where}: missing required key {missing[0]}: the file is incomplete or not a "
                              "drafter of this format; convert the drafter again")
    return values


def _value(key: Key, field: Value, where: str) -> Any:
    ints = key.kind == Kind.INTS
    if not (field.type == ARRAY and field.elem_type in INTEGERS if ints else field.type in _KIND_TYPES[key.kind]):
        raise ConversionError(f"{where}: {key.name} is {field.describe()}, expected {key.kind.value}: the file is "
                              "corrupt or was written by another tool; convert the drafter again")
    if ints and field.count > key.max_len:  # shorter than gguf_file.SHORT_ARRAY: read
        raise ConversionError(f"{where}: {key.name} has {field.count} elements, at most {key.max_len}")
    items = field.value if ints else [field.value] if key.kind == Kind.INT else []
    if not all(key.minimum <= v <= key.maximum for v in items):
        raise ConversionError(f"{where}: {key.name} = {field.value} is outside {key.minimum}..{key.maximum}")
    return field.value


def _hparams(values: dict[str, Any], where: str) -> Hparams:
    def get(short: str) -> Any:
        name = f"{ARCH}.{short}"
        return values.get(name, KEYS_BY_NAME[name].default)

    def fail(message: str) -> ConversionError:
        return ConversionError(f"{where}: {message}")

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length")
    if head_dim is None:
        if n_embd % n_head:
            raise fail(f"no {ARCH}.attention.key_length, and embedding_length {n_embd} is not a multiple of "
                       f"head_count {n_head}")
        head_dim = n_embd // n_head
    n_head_kv = get("attention.head_count_kv") or n_head
    if n_head % n_head_kv:
        raise fail(f"{ARCH}.attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    if head_dim % 2:
        raise fail(f"the head size {head_dim} is odd: RoPE needs an even head size")
    for short, feature in (("attention.value_length", "value heads of another size"),
                           ("rope.dimension_count", "partial rotary embeddings")):
        if (v := get(short)) not in (None, head_dim):
            raise fail(f"{ARCH}.{short} = {v} differs from the head size {head_dim}: {feature}, which this "
                       "runtime does not implement")
    sections = get("rope.dimension_sections") or []
    if any(sections) and (sections[0] != head_dim // 2 or any(sections[1:])):
        raise fail(f"{ARCH}.rope.dimension_sections = {sections}: multi-section M-RoPE, which this runtime does not "
                   f"implement (only [{head_dim // 2}, 0, 0, 0])")
    return Hparams(n_embd=n_embd, n_layer=get("block_count"), n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                   n_ff=get("feed_forward_length"), rms_eps=get("attention.layer_norm_rms_epsilon"),
                   rope_base=get("rope.freq_base"), target_layers=tuple(get("target_layers")),
                   mask_token_id=values[MASK_KEY], block_size=get("block_size"),
                   embedding_scale=get("embedding_scale"))


def tensor_plan(hp: Hparams) -> Iterator[tuple[int | None, str, Tensor, Shape]]:
    """Every tensor of the drafter: layer (None: global), GGUF name, schema entry, shape in ggml order; globals
    first, then layer by layer."""
    dims = {Dim.EMBD: hp.n_embd, Dim.FEATURES: hp.n_embd * hp.n_extract, Dim.Q: hp.n_head * hp.head_dim,
            Dim.KV: hp.n_head_kv * hp.head_dim, Dim.HEAD: hp.head_dim, Dim.FF: hp.n_ff}
    # lazily: a corrupt block_count can be 2^31
    for i, group in itertools.chain([(None, GLOBAL_TENSORS)], ((i, LAYER_TENSORS) for i in range(hp.n_layer))):
        for t in group:
            yield i, t.name if i is None else f"blk.{i}.{t.name}", t, tuple(dims[d] for d in t.shape)


def _check_tensors(hp: Hparams, tensors: Mapping[str, TensorInfo], where: str) -> None:
    # extras first, from the names alone: a corrupt block_count must not make us list billions of expected names
    if extra := sorted(name for name in tensors if not _expected(name, hp.n_layer)):
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ConversionError(f"{where}: unexpected tensor {extra[0]}{more}: it belongs to a feature this runtime "
                              f"does not implement, or to more layers than block_count {hp.n_layer}")
    # no extras: the tensors present are expected ones, so the first missing ones come within len(tensors) + 3
    missing: list[str] = []
    for _, name, t, shape in tensor_plan(hp):
        if name not in tensors:
            missing.append(name)
            if len(missing) == 3:
                break
            continue
        got_shape, got_type = tensors[name].shape, tensors[name].type
        if _padded(got_shape) != _padded(shape):
            raise ConversionError(f"{where}: tensor {name} has shape {list(got_shape)}, the keys give {list(shape)}")
        allowed = NORM_TYPES if len(t.shape) == 1 else MATRIX_TYPES
        if got_type not in allowed:
            raise ConversionError(f"{where}: tensor {name} is {_type_name(got_type)}, expected one of "
                                  f"{', '.join(a.name for a in allowed)}")
    if missing:
        n_missing = len(GLOBAL_TENSORS) + len(LAYER_TENSORS) * hp.n_layer - len(tensors)
        raise ConversionError(f"{where}: {n_missing} tensors missing ({', '.join(missing)}...) for block_count "
                              f"{hp.n_layer}: the file is incomplete or its keys are corrupt")


def _expected(name: str, n_layer: int) -> bool:
    if name in _GLOBAL_TENSOR_NAMES:
        return True
    m = _LAYER_NAME.fullmatch(name)
    return m is not None and int(m[1]) < n_layer and m[2] in _LAYER_TENSOR_NAMES


def _padded(shape: Shape) -> Shape:
    return tuple(shape) + (1,) * (4 - len(shape))  # ggml's trailing dimensions of 1 are no dimensions


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLType(ggml_type).name
    except ValueError:
        return f"of ggml type {ggml_type}"
