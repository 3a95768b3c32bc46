"""ctypes binding of the native helper (libdflash, built from native/ against llama-cpp-python's ggml).

llama_cpp is imported first so that its libggml is the one in the process; libdflash's RPATH points
at the same files, so the helper and llama.cpp share one ggml.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp  # noqa: F401  (loads libllama/libggml before libdflash)
import numpy as np

from dflash_local.errors import NativeError


def _lib_path() -> Path:
    name = {"darwin": "libdflash.dylib", "win32": "dflash.dll"}.get(sys.platform, "libdflash.so")
    return Path(__file__).with_name(name)


def _load() -> ctypes.CDLL:
    path = _lib_path()
    if not path.exists():
        raise NativeError(f"native helper not found at {path}: reinstall dflash-local (pip install .)")
    lib = ctypes.CDLL(str(path))
    c_int, c_float_p, c_int_p = ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
    sigs = {
        "dflash_ggml_build_version": ([], ctypes.c_char_p),
        "dflash_devices": ([], ctypes.c_char_p),
        "dflash_last_error": ([], ctypes.c_char_p),
        "dflash_exit_on_ggml_abort": ([], None),
        "dflash_ggml_type_size": ([c_int, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)], c_int),
        "dflash_capture_new": ([c_int, c_int_p, c_int], ctypes.c_void_p),
        "dflash_capture_free": ([ctypes.c_void_p], None),
        "dflash_capture_reset": ([ctypes.c_void_p], None),
        "dflash_capture_pull": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), c_int], c_int),
        "dflash_capture_enable": ([ctypes.c_void_p, ctypes.c_bool], None),
        "dflash_capture_n_rows": ([ctypes.c_void_p], c_int),
        "dflash_capture_data": ([ctypes.c_void_p], c_float_p),
        "dflash_capture_layer": ([ctypes.c_void_p, c_int], ctypes.c_void_p),
        "dflash_capture_rows_e4m3": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], c_int),
        "dflash_capture_seconds": ([ctypes.c_void_p], ctypes.c_double),
        "dflash_greedy_sampler_new": ([], ctypes.c_void_p),
        "dflash_greedy_sampler_share": ([ctypes.c_void_p], ctypes.c_void_p),
        "dflash_drafter_load": ([ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, c_int, c_int], ctypes.c_void_p),
        "dflash_drafter_free": ([ctypes.c_void_p], None),
        "dflash_drafter_get_info": ([ctypes.c_void_p, ctypes.c_void_p], c_int),
        "dflash_drafter_inject": ([ctypes.c_void_p, c_float_p, c_int, c_int], c_int),
        "dflash_drafter_inject_layers": ([ctypes.c_void_p, ctypes.c_void_p, c_int, c_int], c_int),
        "dflash_drafter_inject_gather": ([ctypes.c_void_p, ctypes.c_void_p, c_int, c_int_p, c_int, c_int], c_int),
        "dflash_drafter_crop": ([ctypes.c_void_p, c_int], c_int),
        "dflash_drafter_set_shapes": ([ctypes.c_void_p, c_int, c_int], c_int),
        "dflash_drafter_n_pos": ([ctypes.c_void_p], c_int),
        "dflash_drafter_draft": ([ctypes.c_void_p, c_int, c_int, c_int, c_int, c_int_p, c_float_p, c_float_p], c_int),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


lib = _load()


def _check(result: int | None) -> int:
    if result is None or result < 0:
        raise NativeError(lib.dflash_last_error().decode())
    return result


def greedy_sampler(share: ctypes.c_void_p | None = None) -> ctypes.c_void_p:
    """A llama.cpp backend sampler picking every output row's argmax in one pass over all rows (native/greedy.cpp),
    owned by the sampler chain it is added to; given `share` (another one), that one's argmax: samplers of several
    sequences pick all of a pass's rows in one."""
    return ctypes.c_void_p(lib.dflash_greedy_sampler_share(share) if share else lib.dflash_greedy_sampler_new())


def build_ggml_version() -> str:
    """The ggml version libdflash was compiled against."""
    return lib.dflash_ggml_build_version().decode()


def loaded_ggml_version() -> str:
    """The ggml version of the libggml loaded in this process (llama-cpp-python's).

    dlsym on libdflash's handle searches its dependencies, i.e. the libggml-base already loaded.
    """
    lib.ggml_version.restype = ctypes.c_char_p
    return lib.ggml_version().decode()


def cpu_has_amx() -> bool:
    """Whether ggml's CPU backend uses AMX here (its AMX matmul segfaults: llama.cpp issue #20824)."""
    lib.ggml_cpu_has_amx_int8.restype = ctypes.c_int
    return bool(lib.ggml_cpu_has_amx_int8())


def exit_on_ggml_abort() -> None:
    """A failed assertion in llama.cpp or ggml (a corrupt model it trusted, or a bug) ends the process with one
    `error:` line on stderr and exit code 1, not a backtrace and SIGABRT; for the command line."""
    lib.dflash_exit_on_ggml_abort()


def ggml_type_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (elements per block, bytes per block), for every type this ggml knows."""
    block, size, sizes = ctypes.c_int64(), ctypes.c_int64(), {}
    for t in range(256):  # ggml has some 40 types
        if lib.dflash_ggml_type_size(t, ctypes.byref(block), ctypes.byref(size)) == 0:
            sizes[t] = (block.value, size.value)
    return sizes


def devices() -> list[str]:
    """ggml devices the loaded backends expose ("CPU", "CUDA0", ...)."""
    return [d for d in lib.dflash_devices().decode().split(",") if d]


def _as_float_ptr(a: np.ndarray) -> ctypes._Pointer:
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class Capture:
    """Target hidden-state capture: pass `callback` and `user_data` as cb_eval / cb_eval_user_data."""

    def __init__(self, n_embd: int, target_layers: list[int]):
        arr = (ctypes.c_int32 * len(target_layers))(*target_layers)
        self._ptr = lib.dflash_capture_new(n_embd, arr, len(target_layers))
        if not self._ptr:
            raise NativeError(lib.dflash_last_error().decode())
        self.n_extract, self.width = len(target_layers), n_embd * len(target_layers)
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(
            ctypes.cast(lib.dflash_capture_eval, ctypes.c_void_p).value
        )
        self.user_data = ctypes.c_void_p(self._ptr)
        self.enabled = True
        self._deferred: tuple[Callable[[], list[int]], int] | None = None

    def reset(self) -> None:
        lib.dflash_capture_reset(self._ptr)
        self._deferred = None

    def enable(self, on: bool) -> None:
        lib.dflash_capture_enable(self._ptr, on)
        self.enabled = on

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Off for the passes inside (their rows are not wanted), then on again."""
        self.enable(False)
        try:
            yield
        finally:
            self.enable(True)

    def pull(self, layers: list[int], n_rows: int) -> None:
        """Append the rows that llama.cpp's layer-input capture left at these addresses (one [n_rows, n_embd] float
        buffer per extracted layer, in the order of target_layers)."""
        _check(lib.dflash_capture_pull(self._ptr, (ctypes.c_void_p * len(layers))(*layers), n_rows))

    def defer(self, layers: Callable[[], list[int]], n_rows: int) -> None:
        """Rows that llama.cpp's layer-input capture left in its own buffers (layers() gives pull's addresses once
        they are there), pulled only when read or flushed: a drafting step's injection reads them there instead. Rows
        deferred before must have been flushed before the decode that overwrote them."""
        assert self._deferred is None, "flush() before the next decode"
        self._deferred = (layers, n_rows)

    def flush(self) -> None:
        """Pull the deferred rows: before they are read, or before a decode overwrites llama.cpp's buffers."""
        if self._deferred:
            layers, n_rows = self._deferred
            self._deferred = None
            self.pull(layers(), n_rows)

    def layers(self, n: int) -> list[int]:
        """Where the first n rows captured since the last reset are, one [n_rows, n_embd] float buffer per extracted
        layer: llama.cpp's own buffers where the deferred rows are all of them, else the capture's (flushed). Valid
        until the next decode or reset."""
        if self._deferred is not None and lib.dflash_capture_n_rows(self._ptr) == 0:
            layers, held = self._deferred
        else:
            self.flush()
            layers, held = None, _check(lib.dflash_capture_n_rows(self._ptr))
        if not 0 < n <= held:
            raise NativeError(f"{n} feature rows asked for, {held} captured")
        if layers is not None:
            return layers()
        return [lib.dflash_capture_layer(self._ptr, j) for j in range(self.n_extract)]

    def rows(self) -> np.ndarray:
        """Features captured since the last reset, [n_rows, n_extract * n_embd] (a view; copy to keep)."""
        self.flush()
        n = _check(lib.dflash_capture_n_rows(self._ptr))
        if n == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        return np.ctypeslib.as_array(lib.dflash_capture_data(self._ptr), shape=(n, self.width))

    def rows_e4m3(self) -> tuple[np.ndarray, np.ndarray]:
        """rows() as float8 e4m3 codes (uint8, same shape) and a scale per row and layer ([n_rows, n_extract]
        float32): value = code's value * scale."""
        self.flush()
        n = _check(lib.dflash_capture_n_rows(self._ptr))
        codes = np.empty((n, self.width), dtype=np.uint8)
        scales = np.empty((n, self.n_extract), dtype=np.float32)
        _check(lib.dflash_capture_rows_e4m3(self._ptr, codes.ctypes.data, scales.ctypes.data))
        return codes, scales

    @property
    def seconds(self) -> float:
        return lib.dflash_capture_seconds(self._ptr)

    def close(self) -> None:
        if self._ptr:
            lib.dflash_capture_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


class _Info(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "n_embd n_vocab n_layer n_head n_head_kv head_dim n_ff n_extract block_size mask_token_id n_ctx".split()
        )
    ] + [("target_layers", ctypes.c_int32 * 64)]


@dataclass(frozen=True)
class DrafterInfo:
    n_embd: int
    n_vocab: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    block_size: int
    mask_token_id: int
    n_ctx: int
    target_layers: tuple[int, ...]


class Drafter:
    """A DFlash drafter GGUF on a ggml device, using the target GGUF's embedding and LM head."""

    acceptance_key = ""  # what its acceptance is cached under beside its file (an emulated drafter's profile)

    def __init__(self, drafter_path: str | Path, target_path: str | Path, *, n_ctx: int = 4096,
                 device: str | None = None, n_threads: int = 0):
        self._ptr = lib.dflash_drafter_load(
            str(drafter_path).encode(), str(target_path).encode(),
            device.encode() if device else None, n_ctx, n_threads,
        )
        if not self._ptr:
            raise NativeError(lib.dflash_last_error().decode())
        self.path, self.device, self.n_threads = Path(drafter_path), device or "CPU", n_threads
        raw = _Info()
        lib.dflash_drafter_get_info(self._ptr, ctypes.byref(raw))
        fields = {name: getattr(raw, name) for name, _ in _Info._fields_[:-1] if name != "n_extract"}
        self.info = DrafterInfo(**fields, target_layers=tuple(raw.target_layers[: raw.n_extract]))
        self._tokens = np.zeros(self.info.block_size, dtype=np.int32)

    def set_shapes(self, kv_min: int, inject_rows: int) -> None:
        """The shapes the drafter's graphs keep between calls (dflash.h): on the CPU, where they are exact, tests set a
        GPU's to check its padding."""
        _check(lib.dflash_drafter_set_shapes(self._ptr, kv_min, inject_rows))

    def inject(self, features: np.ndarray, pos0: int) -> None:
        """K/V of target features [n, n_extract * n_embd] at positions pos0 .. pos0+n-1."""
        f = np.ascontiguousarray(features, dtype=np.float32)
        _check(lib.dflash_drafter_inject(self._ptr, _as_float_ptr(f), f.shape[0], pos0))

    def inject_layers(self, layers: list[int], n: int, pos0: int) -> None:
        """inject() from each extracted layer's rows apart: layers[j] the address of [n, n_embd] floats (where
        the capture or llama.cpp's layer-input extraction left them: Capture.layers)."""
        _check(lib.dflash_drafter_inject_layers(self._ptr, (ctypes.c_void_p * len(layers))(*layers), n, pos0))

    def inject_gather(self, layers: list[int], n_held: int, rows: list[int], pos0: int) -> None:
        """inject_layers() of the rows picked out of each layer's [n_held, n_embd] rows (a tree's accepted path):
        row rows[i] at position pos0 + i."""
        picked = (ctypes.c_int32 * len(rows))(*rows)
        _check(lib.dflash_drafter_inject_gather(self._ptr, (ctypes.c_void_p * len(layers))(*layers), n_held,
                                                 picked, len(rows), pos0))

    def crop(self, n_pos: int) -> None:
        _check(lib.dflash_drafter_crop(self._ptr, n_pos))

    @property
    def n_pos(self) -> int:
        return lib.dflash_drafter_n_pos(self._ptr)

    def draft(self, anchor: int, block_size: int | None = None, n: int | None = None) -> np.ndarray:
        """Greedy draft of the first n (default: all block_size-1) tokens of the block following `anchor` at
        position n_pos. The block is always whole (its positions attend to each other), so a draft does not depend
        on n; a smaller n saves the LM head's rows."""
        b = block_size or self.info.block_size
        out = self._tokens[: n or b - 1]
        _check(lib.dflash_drafter_draft(self._ptr, anchor, b, len(out), 1,
                                        out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), None, None))
        return out.copy()

    def draft_top(self, anchor: int, n_top: int, block_size: int | None = None,
                  n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The n_top likeliest tokens of each of the first n (default: all block_size-1) draft positions and their
        probabilities ([n, n_top] each), likeliest first: the marginals a tree of drafts is built from."""
        if n_top < 2:  # the helper's one-token path takes the argmax alone, without probabilities
            raise ValueError("draft_top needs n_top >= 2; draft gives the likeliest tokens")
        b = block_size or self.info.block_size
        ids = np.zeros((n or b - 1, n_top), dtype=np.int32)
        probs = np.zeros_like(ids, dtype=np.float32)
        _check(lib.dflash_drafter_draft(self._ptr, anchor, b, len(ids), n_top,
                                        ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), _as_float_ptr(probs), None))
        order = np.argsort(-probs, axis=1, kind="stable")
        return np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)

    def draft_logits(self, anchor: int, block_size: int | None = None) -> np.ndarray:
        """Logits [block_size-1, n_vocab] of the draft positions (for tests and checks)."""
        b = block_size or self.info.block_size
        ids = np.zeros(b - 1, dtype=np.int32)
        logits = np.zeros((b - 1, self.info.n_vocab), dtype=np.float32)
        _check(lib.dflash_drafter_draft(self._ptr, anchor, b, b - 1, 1,
                                        ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), None, _as_float_ptr(logits)))
        return logits

    def close(self) -> None:
        if self._ptr:
            lib.dflash_drafter_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()
