"""AutoAWQ 4-bit GEMM checkpoints: their quantization config, their packed layout, and its exact Q4_1 form.

An AWQ group (w = (q - z) * s, q and z in 0..15) is a run of GGUF Q4_1 blocks (w = q * d + m) with d = s and
m = -z * s: the 4-bit codes are carried over as they are; only d and m are rounded (to float16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import gguf
import numpy as np

from dflash_local.convert.gguf_target import ConversionError

BITS = 4
PACK = 32 // BITS  # nibbles per int32
# AutoAWQ's GEMM packing: the nibble at bits 4*i..4*i+3 of an int32 holds column AWQ_ORDER[i] of its 8 columns
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
Q4_1_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_1][0]  # 32 weights
AWQ_SUFFIXES = ("qweight", "qzeros", "scales")


class AwqConfig(NamedTuple):
    group_size: int


def parse_quant_config(q: Mapping[str, Any] | None, where: str) -> AwqConfig:
    """A quantization_config, refusing everything but AutoAWQ 4-bit GEMM with zero points."""
    if q is None:
        raise ConversionError(f"{where}: no quantization_config (nor quant_config.json): not an AWQ checkpoint")

    def refuse(field: str, why: str) -> ConversionError:
        return ConversionError(f"{where}: quantization_config.{field} = {q.get(field)!r}: {why}")

    if str(q.get("quant_method", "")).lower() != "awq":
        raise refuse("quant_method", "not an AWQ checkpoint (only quant_method 'awq' is converted)")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise refuse("version", "only AutoAWQ's GEMM layout is converted (GEMV, Marlin, ExLlama pack differently)")
    bits_field = "bits" if "bits" in q else "w_bit"
    if q.get(bits_field, BITS) != BITS:
        raise refuse(bits_field, f"only {BITS}-bit AWQ is converted")
    if q.get("zero_point", True) is not True:
        raise refuse("zero_point", "only AWQ with zero points is converted")
    group_field = "group_size" if "group_size" in q else "q_group_size"
    group = q.get(group_field)
    if not isinstance(group, int) or group <= 0 or group % Q4_1_BLOCK:
        raise refuse(group_field, f"the group size must be a positive multiple of {Q4_1_BLOCK} (a Q4_1 block)")
    return AwqConfig(group)


def unpack(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols / 8] in AutoAWQ's GEMM order -> uint8 codes [rows, cols] in column order."""
    words = packed.view(np.uint32)
    codes = np.empty((packed.shape[0], packed.shape[1] * PACK), np.uint8)
    for i, column in enumerate(AWQ_ORDER):  # nibble i is column AWQ_ORDER[i] of each 8
        codes[:, column::PACK] = (words >> (BITS * i)) & 0xF
    return codes


class AwqLinear(NamedTuple):
    """One AWQ linear layer in GGUF's orientation: rows are output features, groups run along input features."""

    codes: np.ndarray  # uint8 [out, in]
    zeros: np.ndarray  # uint8 [out, in / group]
    scales: np.ndarray  # float16 [out, in / group]

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def permute_rows(self, order: np.ndarray) -> AwqLinear:
        return AwqLinear(self.codes[order], self.zeros[order], self.scales[order])

    def dequantize(self) -> np.ndarray:
        """float32 [out, in], as AutoAWQ computes it: (q - z) * s."""
        expand = lambda a: np.repeat(a.astype(np.float32), self.group_size, axis=1)  # noqa: E731
        return (self.codes.astype(np.float32) - expand(self.zeros)) * expand(self.scales)

    def to_q4_1(self) -> np.ndarray:
        """Q4_1 blocks as bytes [out, in / 32 * 20]: d = s, m = -z * s (float16), the codes unchanged."""
        per_group = self.group_size // Q4_1_BLOCK
        s = self.scales.astype(np.float32)
        d = np.repeat(self.scales.astype(np.float16), per_group, axis=1)
        m = np.repeat((-self.zeros.astype(np.float32) * s).astype(np.float16), per_group, axis=1)
        q = self.codes.reshape(*d.shape, Q4_1_BLOCK)
        qs = q[..., :Q4_1_BLOCK // 2] | (q[..., Q4_1_BLOCK // 2:] << 4)  # byte j: element j low, j + 16 high
        blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
        return blocks.reshape(q.shape[0], -1)


def read_linear(name: str, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, cfg: AwqConfig) -> AwqLinear:
    """Unpack AutoAWQ's qweight [in, out / 8], qzeros [in / group, out / 8], scales [in / group, out]."""
    n_in, n_out = qweight.shape[0], scales.shape[1]
    want = {"qweight": (n_in, n_out // PACK), "qzeros": (n_in // cfg.group_size, n_out // PACK),
            "scales": (n_in // cfg.group_size, n_out)}
    for what, t in zip(AWQ_SUFFIXES, (qweight, qzeros, scales)):
        if n_in % cfg.group_size or n_out % PACK or tuple(t.shape) != want[what]:
            raise ConversionError(f"{name}.{what} has shape {list(t.shape)}, not AutoAWQ GEMM's {list(want[what])} "
                                  f"for {n_in} inputs, {n_out} outputs and group size {cfg.group_size}")
    for what, t in zip(AWQ_SUFFIXES, (qweight, qzeros)):
        if t.dtype != np.int32:
            raise ConversionError(f"{name}.{what} is {t.dtype}, not int32: not AutoAWQ's GEMM layout")
    return AwqLinear(np.ascontiguousarray(unpack(qweight).T), np.ascontiguousarray(unpack(qzeros).T),
                     np.ascontiguousarray(scales.astype(np.float16).T))
