"""A target GGUF checked before llama.cpp loads it: its structure (gguf_file), and the values llama.cpp trusts and
asserts on (an abort, not an error) when a corrupt file breaks them. Found by tests/test_fuzz.py; what is not
caught here ends at llama.cpp's own checks, or at its assertions, which `dflash run` turns into an error line
(native.exit_on_ggml_abort)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from dflash_local.errors import UserError
from dflash_local.gguf_file import ARRAY, FLOATS, INTEGERS, STRING, Layout, Value, read_layout

TOKENS = "tokenizer.ggml.tokens"
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
_U32 = 2**32  # llama.cpp keeps head counts and sizes, and their products, in 32 bits


def check_target_file(path: Path) -> Layout:
    """The checked layout of a target GGUF (cached per file version: the run's loader and the target both ask)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return _checked(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _checked(path: str, mtime_ns: int, size: int) -> Layout:
    layout = read_layout(path, keep=(TOKENS,))
    if layout.arch is None:
        raise UserError(f"{path} has no general.architecture key (a string): not a model llama.cpp can load")
    _check_vocab(layout)
    _check_hparams(layout, layout.arch)
    return layout


def _fail(layout: Layout, message: str) -> UserError:
    return UserError(f"{layout.path}: {message}: the file is damaged or not a model llama.cpp can load")


def _check_vocab(layout: Layout) -> None:
    tokens = layout.fields.get(TOKENS)
    if tokens is None:
        return
    if tokens.type != ARRAY or tokens.elem_type != STRING:
        raise _fail(layout, f"{TOKENS} is {tokens.describe()}, expected an array of strings")
    if len(set(tokens.value)) != tokens.count:  # llama.cpp maps each token's text to its id
        raise _fail(layout, f"{TOKENS} has the same token twice")
    for key, types in (("tokenizer.ggml.scores", FLOATS), ("tokenizer.ggml.token_type", INTEGERS)):
        v = layout.fields.get(key)
        if v is not None and (v.type != ARRAY or v.elem_type not in types or v.count != tokens.count):
            raise _fail(layout, f"{key} is {v.describe()}, expected one per token ({tokens.count})")


def _ints(layout: Layout, key: str) -> list[int] | None:
    """An integer key's value, or its per-layer values (an array); None when absent."""
    v: Value | None = layout.fields.get(key)
    if v is None:
        return None
    if v.type in INTEGERS:
        return [v.value]
    if v.type == ARRAY and v.elem_type in INTEGERS:
        return v.value  # None: longer than any model's layers, which llama.cpp refuses
    raise _fail(layout, f"{key} is {v.describe()}, expected an integer")


def _check_hparams(layout: Layout, arch: str) -> None:
    n_layer = _ints(layout, f"{arch}.block_count")
    if n_layer is not None and (len(n_layer) != 1 or not 1 <= n_layer[0] <= MAX_LAYERS):
        raise _fail(layout, f"{arch}.block_count is {layout.fields[f'{arch}.block_count'].value}, not 1..{MAX_LAYERS}")
    heads = _ints(layout, f"{arch}.attention.head_count") or []
    kv_heads = _ints(layout, f"{arch}.attention.head_count_kv") or heads
    if len(kv_heads) == 1:
        kv_heads = kv_heads * len(heads)
    if len(heads) == 1:
        heads = heads * len(kv_heads)
    for n_head, n_kv in zip(heads, kv_heads):  # grouped-query attention: every KV head serves a whole group
        if n_kv < 0 or n_head < 0 or (n_kv and (n_head % n_kv or n_kv > n_head)):
            raise _fail(layout, f"{arch}.attention.head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    for key in ("embedding_length", "feed_forward_length", "rope.dimension_count", "attention.key_length",
                "attention.value_length"):
        if any(not 0 <= v < _U32 // 2 for v in _ints(layout, f"{arch}.{key}") or []):
            raise _fail(layout, f"{arch}.{key} is out of range")
    sizes = [s for key in ("key_length", "value_length") for s in _ints(layout, f"{arch}.attention.{key}") or []]
    if heads and sizes and max(heads) * max(sizes) >= _U32 // 2:
        raise _fail(layout, f"{arch}.attention.head_count {max(heads)} times the head size {max(sizes)} overflows")
    n_rot, head = _ints(layout, f"{arch}.rope.dimension_count"), _ints(layout, f"{arch}.attention.key_length")
    if n_rot and head and n_rot[0] > max(head):  # RoPE rotates part of a head at most
        raise _fail(layout, f"{arch}.rope.dimension_count {n_rot[0]} exceeds the head size {max(head)}")
