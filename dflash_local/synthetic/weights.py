"""The tensors of synthetic models: float32 values drawn at random, or random quantized blocks (Q4_K, Q6_K, Q8_0;
F16 as one-value blocks) generated a slice at a time while the file is written, so that a 16 GB model takes little
memory and no float copy.

A random block is random codes under fixed scales chosen so that its values have mean ~0 and the wanted spread:
the same spread as the float weights they stand for, so that activations stay at the scale the float models keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from dflash_local.console import console
from dflash_local.convert.gguf_target import atomic_path

Q = gguf.GGMLQuantizationType
CHUNK_BYTES = 64 << 20  # generated and written at a time


@dataclass(frozen=True)
class Spec:
    """One tensor of a model: its name, its shape in numpy order (rows, row length), how its float values are drawn,
    and for a matrix the spread of its weights (which random quantized blocks reproduce)."""

    name: str
    shape: tuple[int, ...]
    draw: Callable[[np.random.Generator], np.ndarray]
    std: float | None = None


def matrix(name: str, n_out: int, n_in: int, std: float | None = None) -> Spec:
    # 1/sqrt(fan_in) keeps activations at unit scale through every projection
    std = n_in**-0.5 if std is None else std
    return Spec(name, (n_out, n_in), lambda rng: rng.normal(0.0, std, (n_out, n_in)), std)


def norm(name: str, n: int, scale: float = 1.0) -> Spec:
    return Spec(name, (n,), lambda rng: scale + rng.normal(0.0, 0.1, n))


def vector(name: str, n: int, draw: Callable[[np.random.Generator], np.ndarray]) -> Spec:
    return Spec(name, (n,), draw)


# ---- random quantized blocks (layouts of ggml-common.h) ------------------------------------------------------------
# Uniform codes: q in 0..15 (Q4_K), 0..63 (Q6_K), -128..127 (Q8_0) have these standard deviations.
_STD4, _STD6, _STD8 = math.sqrt((16**2 - 1) / 12), math.sqrt((64**2 - 1) / 12), math.sqrt((256**2 - 1) / 12)
_SUB_SCALE = 32  # every sub-block's 6-bit (K-quants) or 8-bit (Q6_K) scale
# Q4_K's 12 bytes of 6-bit scales and mins (get_scale_min_k4), all sub-blocks at scale 32 and min 32
_Q4_K_SCALES = np.array([0xA0] * 8 + [0x00] * 4, dtype=np.uint8)


def _f16(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float16).view(np.uint8)


def _fill_q4_k(blocks: np.ndarray, std: float) -> None:
    # value = d * 32 * q - dmin * 32, q uniform in 0..15: dmin = 7.5 d centres it
    d = std / (_SUB_SCALE * _STD4)
    blocks[:, 0:2] = _f16(d)
    blocks[:, 2:4] = _f16(7.5 * d)
    blocks[:, 4:16] = _Q4_K_SCALES


def _fill_q6_k(blocks: np.ndarray, std: float) -> None:
    # ql[128], qh[64], int8 scales[16], d: value = d * scale * (q - 32), q uniform in 0..63
    blocks[:, 192:208] = _SUB_SCALE
    blocks[:, 208:210] = _f16(std / (_SUB_SCALE * _STD6))


def _fill_q8_0(blocks: np.ndarray, std: float) -> None:
    blocks[:, 0:2] = _f16(std / _STD8)  # d, then 32 int8 codes


def _fill_f16(blocks: np.ndarray, std: float) -> None:
    # each value a random int8 code (its block's first byte) times a fixed scale, as Q8_0's are
    codes = blocks[:, 0].view(np.int8).astype(np.float16)
    blocks[:] = (codes * np.float16(std / _STD8)).view(np.uint8).reshape(-1, 2)


_FILL = {Q.Q4_K: _fill_q4_k, Q.Q6_K: _fill_q6_k, Q.Q8_0: _fill_q8_0, Q.F16: _fill_f16}
QUANT_TYPES = tuple(_FILL)


def fit(qtype: Q, row: int) -> Q:
    """qtype where rows of this length are whole blocks of it, else Q8_0, else F32 (a scaled-down shape's odd rows)."""
    for q in (qtype, Q.Q8_0):
        if q in _FILL and row % gguf.GGML_QUANT_SIZES[q][0] == 0:
            return q
    return Q.F32


class RandomBlocks:
    """A quantized tensor of random blocks, made a slice at a time when GGUFWriter writes it (its `tofile`)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, shape: tuple[int, int], qtype: Q, std: float, rng: np.random.Generator,
                 on_bytes: Callable[[int], None] | None = None):
        block, self.type_size = gguf.GGML_QUANT_SIZES[qtype]
        self.shape = (shape[0], shape[1] // block * self.type_size)  # bytes, as GGUFWriter takes quantized data
        self.nbytes = self.shape[0] * self.shape[1]
        self.qtype, self.std, self.rng, self.on_bytes = qtype, std, rng, on_bytes

    def tofile(self, f: BinaryIO) -> None:
        rows, row_bytes = self.shape
        step = max(1, CHUNK_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0) * row_bytes
            raw = self.rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]  # the fastest random bytes
            _FILL[self.qtype](raw.reshape(-1, self.type_size), self.std)
            f.write(raw.data)
            if self.on_bytes:
                self.on_bytes(n)


# ---- writing --------------------------------------------------------------------------------------------------
class TensorWriter:
    """Adds Specs to a GGUFWriter: as float32, or (qtype_of gives a type) matrices as random quantized blocks."""

    def __init__(self, w: gguf.GGUFWriter, rng: np.random.Generator,
                 qtype_of: Callable[[Spec], Q] | None = None):
        self.w, self.rng, self.qtype_of = w, rng, qtype_of
        self._on_bytes: Callable[[int], None] | None = None  # set while writing

    def add(self, spec: Spec) -> None:
        q = Q.F32 if self.qtype_of is None or spec.std is None else fit(self.qtype_of(spec), spec.shape[-1])
        if q == Q.F32:
            self.w.add_tensor(spec.name, np.ascontiguousarray(spec.draw(self.rng), dtype=np.float32))
        else:
            self.w.add_tensor(spec.name, RandomBlocks(spec.shape, q, spec.std, self.rng, self._advance), raw_dtype=q)

    def _advance(self, n: int) -> None:
        if self._on_bytes:
            self._on_bytes(n)

    def write(self, out: Path, progress: bool = False, on_bytes: OnBytes | None = None) -> Path:
        """Header, keys and tensors to out, under a temporary name renamed at the end (a failure leaves nothing).
        on_bytes(done, total) follows the quantized data as it is written (an exception from it stops the write)."""
        total = sum(ti.nbytes for shard in self.w.tensors for ti in shard.values())
        bar = Progress(TextColumn(f"writing {out.name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), console=console, transient=True, disable=not progress)
        task = bar.add_task("", total=total)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.advance(task, n)
            if on_bytes:
                on_bytes(done, total)

        self._on_bytes = advance
        with atomic_path(out) as tmp, bar:
            try:
                self.w.write_header_to_file(tmp)
                self.w.write_kv_data_to_file()
                self.w.write_tensors_to_file()
            finally:
                self.w.close()
        return out


OnBytes = Callable[[int, int], None]
