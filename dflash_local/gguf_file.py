"""The structure of a GGUF file, read and checked in Python before llama.cpp or ggml sees the file.

ggml's GGUF reader and llama.cpp's loader trust parts of a file that a truncation or a flipped bit corrupts, and some
of what they trust ends in an assertion (an abort) rather than an error: here every count, length, type, shape and
offset is checked against the file, so that a corrupt file is a clear error instead. Fast enough to run before every
load: keys and tensor infos only (array contents are skipped unless asked for), about 0.1 s for a 150k-token
vocabulary. Imports nothing heavy (the command line loads llama.cpp before numpy): ggml's type sizes are asked
for on first use.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dflash_local.errors import NativeError, UserError

# GGUF value types (gguf.GGUFValueType): struct formats of the fixed-size ones
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
INTEGERS = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOATS = frozenset({6, 12})
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
              8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, terminator included
SHORT_ARRAY = 1024  # arrays up to this long keep their values (per-layer values, RoPE sections); longer ones (a
# vocabulary) only on request
DEFAULT_ALIGNMENT = 32


class Value(NamedTuple):
    """A metadata value: scalars and strings as Python values; arrays as a list, or None where skipped."""

    type: int
    value: Any
    elem_type: int | None = None  # arrays: the type of their elements
    count: int = 1  # arrays: their length

    def describe(self) -> str:
        """Its type, for a message: "a uint32", "an array of 3 int32"."""
        if self.type == ARRAY:
            return f"an array of {self.count} {TYPE_NAMES.get(self.elem_type, '?')}"
        name = TYPE_NAMES[self.type]
        return f"{'an' if name[0] in 'aeio' else 'a'} {name}"  # a uint32, an int32


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (the row) first
    type: int  # ggml type
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """What a GGUF file declares, every part of it inside the file."""

    path: Path
    fields: dict[str, Value]
    tensors: dict[str, TensorInfo]
    tensor_info_offset: int  # where the key-value section ends and the tensor infos begin
    data_offset: int  # where the tensor data begins
    size: int

    @property
    def arch(self) -> str | None:
        field = self.fields.get("general.architecture")
        return field.value if field is not None and field.type == STRING else None


class _Corrupt(Exception):
    """A structural fault, with what was expected; read_layout adds the file and the offset."""


def read_layout(path: Path | str, keep: Collection[str] = ()) -> Layout:
    """The checked structure of a GGUF file; `keep`: keys whose long arrays are read too. Raises UserError."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _Parser(path, mm, frozenset(keep)).layout()
    except ValueError as e:  # mmap of an empty file
        raise UserError(f"{path} is not a valid GGUF file ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


@functools.cache
def _tensor_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (elements per block, bytes per block), from the ggml llama.cpp runs on (imported here: it loads
    llama.cpp). Where the native helper is not built (training from the source tree on a lent GPU machine), from
    gguf-py's table, which agrees on the types weights are stored in."""
    try:
        from dflash_local.native import ggml_type_sizes
    except (NativeError, ImportError):
        from gguf.constants import GGML_QUANT_SIZES

        return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}
    return ggml_type_sizes()


class _Parser:
    def __init__(self, path: Path, buf: mmap.mmap, keep: frozenset[str]):
        self.path, self.buf, self.keep, self.off, self.size = path, buf, keep, 0, len(buf)

    def layout(self) -> Layout:
        try:
            return self._parse()
        except _Corrupt as e:
            raise UserError(f"{self.path} is not a valid GGUF file: {e} (at byte {self.off} of {self.size}); "
                            f"the file is damaged or incomplete: download or convert it again") from None

    def _take(self, n: int) -> int:
        """The offset of the next n bytes, which must lie inside the file."""
        if n < 0 or self.off + n > self.size:
            raise _Corrupt(f"the file ends inside a {n}-byte field")
        off, self.off = self.off, self.off + n
        return off

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack_from("<" + fmt, self.buf, self._take(struct.calcsize(fmt)))[0]

    def _string(self, limit: int | None = None) -> str:
        n = self._unpack("Q")
        if limit is not None and n > limit:
            raise _Corrupt(f"a name of {n} bytes (at most {limit})")
        raw = self.buf[self._take(n):self.off]
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise _Corrupt(f"a name that is not UTF-8 text ({raw[:40]!r})") from None

    def _value(self, vtype: int, keep: bool) -> Value:
        if vtype in SCALARS:
            return Value(vtype, self._unpack(SCALARS[vtype]))
        if vtype == STRING:
            n = self._unpack("Q")
            return Value(vtype, self.buf[self._take(n):self.off].decode(errors="replace"))
        if vtype != ARRAY:
            raise _Corrupt(f"unknown value type {vtype}")
        etype, count = self._unpack("I"), self._unpack("Q")
        keep = keep or count <= SHORT_ARRAY
        if etype in SCALARS:
            fmt = SCALARS[etype]
            start = self._take(count * struct.calcsize(fmt))
            items = list(struct.unpack_from(f"<{count}{fmt}", self.buf, start)) if keep else None
        elif etype == STRING:
            items = self._strings(count, keep)
        else:
            raise _Corrupt(f"an array of {'arrays' if etype == ARRAY else f'unknown type {etype}'}")
        return Value(ARRAY, items, etype, count)

    def _strings(self, count: int, keep: bool) -> list[bytes] | None:
        # the hot loop of a large vocabulary: offsets only, bytes copied when kept
        buf, off, size, u64 = self.buf, self.off, self.size, struct.Struct("<Q").unpack_from
        items: list[bytes] | None = [] if keep else None
        for _ in range(count):
            if off + 8 > size:
                break
            n = u64(buf, off)[0]
            off += 8
            if items is not None and off + n <= size:
                items.append(buf[off:off + n])
            off += n
        else:
            if off <= size:
                self.off = off
                return items
        self.off = min(off, size)
        raise _Corrupt(f"the file ends inside an array of {count} strings")

    def _parse(self) -> Layout:
        magic = self.buf[self._take(4):self.off]
        version = self._unpack("I")
        if magic != b"GGUF" or version not in (2, 3):
            raise _Corrupt(f"not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        fields: dict[str, Value] = {}
        for _ in range(n_kv):
            key = self._string(limit=1 << 16)
            if key in fields:
                raise _Corrupt(f"the key {key} appears twice")
            fields[key] = self._value(self._unpack("I"), key in self.keep)
        alignment = fields.get("general.alignment", Value(4, DEFAULT_ALIGNMENT))
        if alignment.type != 4 or alignment.value <= 0 or alignment.value & (alignment.value - 1):
            raise _Corrupt(f"general.alignment is {alignment.describe()} {alignment.value!r}, not a power of 2")
        info_offset = self.off
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = alignment.value
        data_offset = -(-self.off // align) * align
        tensors: dict[str, TensorInfo] = {}
        sizes = _tensor_sizes()
        for name, shape, ttype, rel in infos:
            if name in tensors:
                raise _Corrupt(f"the tensor {name} appears twice")
            if ttype not in sizes:
                raise _Corrupt(f"tensor {name} has the unknown type {ttype}")
            block, block_bytes = sizes[ttype]
            n = 1
            for ne in shape:
                n *= ne
            if shape[0] % block or n >= 1 << 62:
                raise _Corrupt(f"tensor {name} has the impossible shape {list(shape)} for its type")
            nbytes, start = n // block * block_bytes, data_offset + rel
            if rel % align or start + nbytes > self.size:
                self.off = start
                raise _Corrupt(f"the data of tensor {name} ({nbytes} bytes at {start}) is not inside the file")
            tensors[name] = TensorInfo(name, shape, ttype, start, nbytes)
        return Layout(self.path, fields, tensors, info_offset, data_offset, self.size)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string(limit=MAX_NAME - 1)
        n_dims = self._unpack("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
        shape = tuple(self._unpack("q") for _ in range(n_dims))
        if min(shape) < 0:
            raise _Corrupt(f"tensor {name} has the negative shape {list(shape)}")
        return name, shape, self._unpack("I"), self._unpack("Q")
