"""native/dflash_schema.h, the C++ loader's copy of the schema's tables, written from convert/schema.py. After a
change to the schema, install (pip install .), then write the header from the installed package (-P: not the source
tree, which has no dflash_local/convert) and install again to build it:

    python -P -m dflash_local.convert.schema_header > native/dflash_schema.h

tests/test_native.py fails while the committed header differs from what this writes.
"""

from __future__ import annotations

import sys

from dflash_local.convert.schema import (ARCH, GLOBAL_TENSORS, KEYS, LAYER_TENSORS, MASK_KEY, MATRIX_TYPES,
                                         MAX_BLOCK_SIZE, MAX_TARGET_LAYERS, NORM_TYPES, Key, Tensor)

MAX_HARMLESS = 2  # numbers per key in the C++ table

_PREAMBLE = f"""\
// The `dflash` GGUF schema's tables for the C++ loader (native/schema.cpp), written by convert/schema_header.py
// from convert/schema.py, which documents them: do not edit, change the schema and run (see schema_header.py)
//     python -P -m dflash_local.convert.schema_header > native/dflash_schema.h
#pragma once

#include <cstdint>

namespace dflash_schema {{

enum class kind {{ INT, FLOAT, BOOL, STRING, INTS }};
enum class dim {{ EMBD, FEATURES, Q, KV, HEAD, FF }};

struct key {{
    const char * name;
    kind         type;
    bool         required;
    bool         has_default;
    double       default_value;
    int64_t      minimum, maximum;  // INT and each element of INTS
    int32_t      max_len;           // INTS: the most elements
    const char * refused;           // the feature it configures, refused unless harmless ("": none)
    int32_t      n_harmless;        // harmless numbers (bools as 0 and 1) ...
    double       harmless[{MAX_HARMLESS}];
    const char * harmless_str;      // ... or harmless string (nullptr: none)
}};

struct tensor {{
    const char * name;  // per-layer tensors without their "blk.<i>." prefix
    int32_t      n_dims;
    dim          shape[2];  // ggml order: ne[0] first
}};

inline constexpr const char * arch              = "{ARCH}";
inline constexpr const char * mask_key          = "{MASK_KEY}";
inline constexpr int32_t      max_target_layers = {MAX_TARGET_LAYERS};
inline constexpr int32_t      max_block_size    = {MAX_BLOCK_SIZE};
"""


def _num(v: float | str | bool) -> str:
    return repr(float(v))


def _key(k: Key) -> str:
    numbers = [h for h in k.harmless if not isinstance(h, str)]
    strings = [h for h in k.harmless if isinstance(h, str)]
    if len(numbers) > MAX_HARMLESS or len(strings) > 1:
        raise ValueError(f"{k.name}: more harmless values than the C++ table holds")
    harmless = "{" + ", ".join(map(_num, numbers)) + "}"
    string = f'"{strings[0]}"' if strings else "nullptr"
    default = "false, 0.0" if k.default is None else f"true, {_num(k.default)}"
    return (f'    {{ "{k.name}", kind::{k.kind.name}, {str(k.required).lower()}, {default}, {k.minimum}, {k.maximum}, '
            f'{k.max_len}, "{k.refused}", {len(numbers)}, {harmless}, {string} }},')


def _tensor(t: Tensor) -> str:
    shape = ", ".join(f"dim::{d.name}" for d in t.shape)
    return f'    {{ "{t.name}", {len(t.shape)}, {{ {shape} }} }},'


def _types(types: tuple[int, ...]) -> str:
    return ", ".join(str(int(t)) for t in types)


def render() -> str:
    return "\n".join([
        _PREAMBLE,
        "inline constexpr key keys[] = {", *map(_key, KEYS), "};", "",
        "inline constexpr tensor global_tensors[] = {", *map(_tensor, GLOBAL_TENSORS), "};",
        "inline constexpr tensor layer_tensors[] = {", *map(_tensor, LAYER_TENSORS), "};", "",
        "// ggml types (enum ggml_type) of vectors and of matrices",
        f"inline constexpr int32_t norm_types[]   = {{ {_types(NORM_TYPES)} }};",
        f"inline constexpr int32_t matrix_types[] = {{ {_types(MATRIX_TYPES)} }};", "",
        "}  // namespace dflash_schema", "",
    ])


if __name__ == "__main__":
    sys.stdout.write(render())
