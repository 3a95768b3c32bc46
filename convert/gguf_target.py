"""The torch-free part of gguf_io: reading GGUF files, the facts about the target, the output types and the
error. `dflash train` reads these in the process that runs llama.cpp, which must not import torch (in one process
torch's CUDA build and llama.cpp's crash).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from rich.progress import Progress

from dflash_local.console import console
from dflash_local.convert.schema import ARCH, MASK_KEY
from dflash_local.errors import ConversionError

Q = gguf.GGMLQuantizationType
OUTTYPES = {  # --outtype -> (type of the matrices, general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ARRAY, INT32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32


class Reader(gguf.GGUFReader):
    """A GGUFReader that knows its path and parses through a plain ndarray view of its memory map: slicing
    numpy's memmap subclass costs microseconds per slice, seconds over a large vocabulary's strings."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        super().__init__(path)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int) -> Reader:
    return Reader(path)


def read_gguf(path: Path | str) -> Reader:
    """A GGUFReader, cached per file version: parsing a large vocabulary still takes a while."""
    try:
        st = os.stat(path)
        return _cached_reader(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read GGUF {path}: {e}") from None


def field_value(reader: Reader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ConversionError(f"{reader.path}: missing GGUF key {key}")
        return default
    return field.contents()


def _largest(v: int | list[int]) -> int:
    return max(v) if isinstance(v, list) else v  # per-layer arrays (hybrid models): the attention layers' value


@dataclass(frozen=True)
class TargetInfo:
    """What the drafter must agree with in the target GGUF."""

    path: Path
    arch: str
    n_embd: int
    n_layer: int  # decoder layers (MTP layers excluded)
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int  # rows of token_embd
    n_ctx: int
    mrope: bool
    tokenizer: tuple[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]  # every tokenizer.* key


def read_target(path: Path | str) -> TargetInfo:
    r = read_gguf(path)
    arch = field_value(r, "general.architecture")
    if arch == ARCH:
        raise ConversionError(f"{path} is a dflash drafter, not a target model")
    tensors = {t.name: t for t in r.tensors}
    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{path} has no token_embd.weight: not a target model")
    tokenizer = tuple((k, f.contents(), f.types[0], f.types[-1] if f.types[0] == ARRAY else None)
                      for k, f in r.fields.items() if k.startswith("tokenizer.") and k != MASK_KEY)
    if "tokenizer.ggml.model" not in r.fields:
        raise ConversionError(f"{path} has no tokenizer (tokenizer.ggml.model), which the drafter copies")
    n_embd = field_value(r, f"{arch}.embedding_length")
    n_head = _largest(field_value(r, f"{arch}.attention.head_count"))
    return TargetInfo(
        path=Path(path), arch=arch, n_embd=n_embd,
        n_layer=field_value(r, f"{arch}.block_count") - field_value(r, f"{arch}.nextn_predict_layers", 0),
        n_head=n_head, n_head_kv=_largest(field_value(r, f"{arch}.attention.head_count_kv", n_head)),
        head_dim=field_value(r, f"{arch}.attention.key_length", n_embd // n_head),
        n_vocab=int(tensors["token_embd.weight"].shape[1]), n_ctx=field_value(r, f"{arch}.context_length"),
        mrope=any(field_value(r, f"{arch}.rope.dimension_sections", [])), tokenizer=tokenizer)



@contextmanager
def atomic_path(out: Path | str) -> Iterator[Path]:
    """A temporary name beside out to write the file under: renamed to out when the block ends, removed if it fails,
    so that a failure or an interrupt leaves no half-written file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same folder, so that the final rename is atomic
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_gguf(w: gguf.GGUFWriter, out: Path, data: Iterable[np.ndarray], count: int, *, progress: bool) -> Path:
    """Write w (metadata and tensor infos added), then the data of its `count` tensors in their order, atomically."""
    with atomic_path(out) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with Progress(console=console, disable=not progress) as bar:
                task = bar.add_task(f"writing {out.name}", total=count)
                for array in data:
                    w.write_tensor_data(array)
                    bar.advance(task)
        finally:
            w.close()
    return out
