"""The dflash GGUF schema, refused alike by the Python check (what `dflash run` does before loading) and by the C++
loader on its own (native Drafter, as any caller that skips the Python check gets it): every refused key, required
key, key type, range, relation and tensor rule, each refused with a message naming the key or tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from synthetic_drafters import edit_gguf, random_drafter_gguf

from dflash_local.convert import schema, schema_header
from dflash_local.convert.schema_check import check_drafter
from dflash_local.errors import ConversionError
from dflash_local.gguf_file import read_layout
from dflash_local.native import Drafter, NativeError

V = gguf.GGUFValueType
GGUF_TYPES = {schema.Kind.INT: V.UINT32, schema.Kind.FLOAT: V.FLOAT32, schema.Kind.BOOL: V.BOOL,
              schema.Kind.STRING: V.STRING, schema.Kind.INTS: V.ARRAY}
REFUSED = [k for k in schema.KEYS if k.refused]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama target and a valid f32 drafter for it (two layers, three target layers)."""
    from tiny_targets import write_tiny_target

    root = tmp_path_factory.mktemp("schema")
    target = write_tiny_target("llama", root / "target.gguf")
    return target, random_drafter_gguf(target, root / "drafter.gguf", n_layer=2, outtype="f32")


def refusals(drafter: Path, target: Path) -> tuple[str, str]:
    """The Python check's message and the native loader's, each "" where it accepts the drafter."""
    try:
        layout = read_layout(drafter)
        check_drafter(layout.fields, layout.tensors, str(drafter))
        python = ""
    except ConversionError as e:
        python = str(e)
    try:
        Drafter(drafter, target, n_ctx=64, n_threads=1).close()
        native = ""
    except NativeError as e:
        native = str(e)
    return python, native


def assert_refused(files: tuple[Path, Path], tmp_path: Path, words: str, **edits: Any) -> None:
    target, drafter = files
    python, native = refusals(edit_gguf(drafter, tmp_path / "edited.gguf", **edits), target)
    assert words in python, f"Python: {python!r}"
    assert words in native, f"native: {native!r}"


def _unharmful(key: schema.Key) -> Any:
    """A value of the key's kind that turns its feature on."""
    return {schema.Kind.INT: 3, schema.Kind.FLOAT: 0.5, schema.Kind.BOOL: True, schema.Kind.STRING: "other"}[key.kind]


def test_the_native_header_is_the_schema():
    header = Path(__file__).parents[1] / "native" / "dflash_schema.h"
    assert header.read_text() == schema_header.render(), (
        "native/dflash_schema.h is stale: python -P -m dflash_local.convert.schema_header > native/dflash_schema.h")


def test_gguf_py_knows_the_weight_types_as_ggml_does():
    """gguf-py's table stands in for ggml's where the native helper is not built (gguf_file._tensor_sizes)."""
    from gguf.constants import GGML_QUANT_SIZES

    from dflash_local.native import ggml_type_sizes

    Q = gguf.GGMLQuantizationType
    weights = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    ggml = ggml_type_sizes()
    assert {int(t): GGML_QUANT_SIZES[t] for t in weights} == {int(t): ggml[int(t)] for t in weights}


def test_valid_and_harmless_drafters_load(files, tmp_path):
    target, drafter = files
    assert refusals(drafter, target) == ("", "")
    harmless = {k.name: (k.harmless[0], GGUF_TYPES[k.kind]) for k in REFUSED if k.harmless}
    informational = {"dflash.vocab_size": (508, V.UINT32), "dflash.rope.scaling.finetuned": (False, V.BOOL)}
    edited = edit_gguf(drafter, tmp_path / "harmless.gguf", keys=harmless | informational)
    assert refusals(edited, target) == ("", "")


@pytest.mark.parametrize("key", REFUSED, ids=lambda k: k.name)
def test_refused_keys(files, tmp_path, key):
    assert_refused(files, tmp_path, f"{key.name} = ", keys={key.name: (_unharmful(key), GGUF_TYPES[key.kind])})


@pytest.mark.parametrize("key", [k for k in schema.KEYS if k.required], ids=lambda k: k.name)
def test_missing_required_keys(files, tmp_path, key):
    assert_refused(files, tmp_path, f"missing required key {key.name}", drop=(key.name,))


@pytest.mark.parametrize("key", schema.KEYS, ids=lambda k: k.name)
def test_mistyped_keys(files, tmp_path, key):
    wrong = (7, V.UINT32) if key.kind == schema.Kind.STRING else ("7", V.STRING)
    assert_refused(files, tmp_path, f"{key.name} is a", keys={key.name: wrong})


@pytest.mark.parametrize("key, value, words", [
    ("dflash.mystery_knob", (1, V.UINT32), "unknown key dflash.mystery_knob"),
    ("dflash.block_size", (65, V.UINT32), "dflash.block_size"),
    ("dflash.block_size", (1, V.UINT32), "dflash.block_size"),
    ("dflash.attention.head_count_kv", (0, V.UINT32), "dflash.attention.head_count_kv"),
    ("dflash.embedding_length", (-64, V.INT32), "dflash.embedding_length"),
    ("dflash.target_layers", ([1] * 65, V.ARRAY), "dflash.target_layers"),
    ("dflash.target_layers", ([0, 1], V.ARRAY), "dflash.target_layers"),
    ("dflash.attention.head_count_kv", (3, V.UINT32), "head_count_kv"),
    ("dflash.attention.value_length", (8, V.UINT32), "dflash.attention.value_length"),
    ("dflash.rope.dimension_count", (8, V.UINT32), "dflash.rope.dimension_count"),
    ("dflash.rope.dimension_sections", ([4, 2, 2, 0], V.ARRAY), "dflash.rope.dimension_sections"),
    ("dflash.attention.key_length", (15, V.UINT32), "odd"),
])
def test_values_out_of_range(files, tmp_path, key, value, words):
    assert_refused(files, tmp_path, words, keys={key: value})


def _set(name: str, make) -> Any:
    def edit(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = make(tensors)
    return edit


@pytest.mark.parametrize("edit, words", [
    (_set("blk.0.ffn_up.weight", lambda t: np.zeros((129, 64), np.float32)), "tensor blk.0.ffn_up.weight has shape"),
    (_set("blk.1.attn_norm.weight", lambda t: np.ones((64, 1), np.float32)), "tensor blk.1.attn_norm.weight has shape"),
    (_set("output.weight", lambda t: np.zeros((508, 64), np.float32)), "unexpected tensor"),
    (_set("blk.2.attn_norm.weight", lambda t: np.ones(64, np.float32)), "unexpected tensor"),
    (lambda t: t.pop("blk.1.ffn_down.weight"), "tensors missing (blk.1.ffn_down.weight"),
    (_set("output_norm.weight", lambda t: t["output_norm.weight"].astype(np.float16)), "output_norm.weight is F16"),
    (_set("fc.weight", lambda t: t["fc.weight"].astype(np.int32)), "tensor fc.weight is"),
], ids=["shape", "dims", "extra", "extra layer", "missing", "norm type", "matrix type"])
def test_tensors(files, tmp_path, edit, words):
    assert_refused(files, tmp_path, words, tensors=edit)
