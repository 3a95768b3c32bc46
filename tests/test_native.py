"""The native helper against independent references: the ggml drafter against the torch reference
drafter, and the captured hidden states against a float64 torch forward of the target."""

from __future__ import annotations

import ctypes
import numpy as np
import pytest
import torch
from synthetic_drafters import random_drafter_gguf
from target_reference import hidden_states
from tiny_targets import write_tiny_target

from dflash_local import native
from dflash_local import target as target_module
from dflash_local.convert.gguf_io import load_drafter_gguf
from dflash_local.native import Drafter, NativeError
from dflash_local.target import Target, TargetParams
from dflash_local.train.trainer import encode_features


def test_helper_shares_llama_cpp_ggml():
    assert native.build_ggml_version() == native.loaded_ggml_version()
    assert "CPU" in native.devices()


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_against_reference(drafter_path, target_path, rtol: float, seed: int = 0, padded: bool = False) -> None:
    dr = Drafter(drafter_path, target_path, n_ctx=64, n_threads=1)
    ref = load_drafter_gguf(drafter_path, target_path, dtype=torch.float64)
    info = dr.info
    if padded:  # a GPU's shapes (their defaults on the CPU are exact): 3 masked positions at the first draft
        dr.set_shapes(8, info.block_size)
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((13, len(info.target_layers) * info.n_embd)).astype(np.float32)
    # the context arrives in pieces, as in decoding; a crop then re-injects a different tail
    dr.inject(feats[:8], 0)
    dr.inject(feats[8:], 8)
    for block in (info.block_size, info.block_size, 4):  # the second call reuses the first one's graph
        anchor = int(rng.integers(info.n_vocab))
        got = dr.draft_logits(anchor, block)
        tokens = torch.tensor([anchor] + [info.mask_token_id] * (block - 1))
        with torch.no_grad():
            want = ref(torch.from_numpy(feats).double(), tokens)[1:].numpy()
        assert _rel_err(got, want) < rtol
        # argmax agrees wherever the reference's top-2 margin is clear
        top2 = np.sort(want, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-2 * np.abs(want).max()
        assert (got.argmax(1) == want.argmax(1))[clear].all()
        assert (dr.draft(anchor, block) == got.argmax(1)).all()
    dr.crop(5)
    assert dr.n_pos == 5
    dr.inject(feats[8:], 5)
    got = dr.draft_logits(7, 4)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.concatenate([feats[:5], feats[8:]])).double(),
                   torch.tensor([7] + [info.mask_token_id] * 3))[1:].numpy()
    assert _rel_err(got, want) < rtol
    dr.close()


@pytest.mark.parametrize("arch,n_layer,padded", [("llama", 1, False), ("qwen3", 5, False), ("qwen35", 2, False),
                                                 ("qwen3", 2, True)])
def test_drafter_matches_reference_f32(arch, n_layer, padded, tiny_target, tmp_path):
    target = tiny_target(arch)
    drafter = random_drafter_gguf(target, tmp_path / "d.gguf", n_layer=n_layer, outtype="f32")
    _check_against_reference(drafter, target, rtol=1e-4, padded=padded)


@pytest.mark.parametrize("padded", [False, True])
def test_inject_layers_equals_inject(padded, tiny_target, tmp_path):
    """Each extracted layer's rows apart (as llama.cpp's layer-input capture leaves them) give the drafter what the
    rows side by side give, bit for bit; padded, after pieces of every length."""
    target = tiny_target("qwen3")
    path = random_drafter_gguf(target, tmp_path / "d.gguf", n_layer=2, outtype="f32")
    by_rows, by_layers = Drafter(path, target, n_ctx=64, n_threads=1), Drafter(path, target, n_ctx=64, n_threads=1)
    info = by_rows.info
    n_extract = len(info.target_layers)
    if padded:
        for dr in (by_rows, by_layers):
            dr.set_shapes(8, info.block_size)
    feats = np.random.default_rng(0).standard_normal((20, n_extract * info.n_embd)).astype(np.float32)
    start = 0
    for n in (9, 1, 3, 7):
        piece = feats[start:start + n]
        by_rows.inject(piece, start)
        layers = [np.ascontiguousarray(piece.reshape(n, n_extract, info.n_embd)[:, j]) for j in range(n_extract)]
        by_layers.inject_layers([a.ctypes.data for a in layers], n, start)
        start += n
        np.testing.assert_array_equal(by_layers.draft_logits(5, info.block_size),
                                      by_rows.draft_logits(5, info.block_size))
    by_rows.close()
    by_layers.close()


@pytest.mark.parametrize("outtype,rtol", [("f16", 1e-2), ("q8_0", 3e-2)])
def test_drafter_matches_reference_quantized(outtype, rtol, smollm2_path, tmp_path):
    # SmolLM2: GQA 9/3 heads of 64, a Q4_1 embedding and LM head shared with the target; ggml's
    # q8_0 matmul also rounds the activations to 8 bits, hence the wider tolerance
    drafter = random_drafter_gguf(smollm2_path, tmp_path / "d.gguf", n_layer=1, outtype=outtype)
    _check_against_reference(drafter, smollm2_path, rtol=rtol)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama.cpp's layer-input capture, the eval callback
def test_capture_equals_reference_hidden_states(tiny_target, arch):
    path = tiny_target(arch)
    layers = (1, 2, 3)
    tokens = [1, 5, 80, 81, 82, 40, 33, 260, 261, 7, 9]
    ref = hidden_states(path, tokens)
    for n_ubatch in (512, 4):  # 4: llama.cpp splits the batch into ubatches
        tg = Target(path, TargetParams(n_ctx=64, n_batch=16, n_ubatch=n_ubatch), capture_layers=layers)
        assert tg.capture_method == ("layer inputs" if arch == "llama" else "eval callback")
        tg.decode(tokens, 0, all_logits=True)
        got = tg.features()
        assert got.shape == (len(tokens), len(layers) * tg.n_embd)
        for j, layer in enumerate(layers):
            block = got[:, j * tg.n_embd:(j + 1) * tg.n_embd]
            # llama.cpp keeps K/V in f16 by default; a wrong layer or row would be off by O(1)
            assert _rel_err(block, ref[layer]) < 5e-3
            assert min(_rel_err(block, other) for i, other in enumerate(ref) if i != layer) > 0.1
        # the training data's float8 copy: each layer's values over their largest / 448, rounded as torch rounds
        # them (trainer.encode_features, which the torch target of bench/train uses), bit for bit
        codes, scales = tg.capture.rows_e4m3()
        want_codes, want_scales = encode_features(torch.from_numpy(got).unflatten(1, (len(layers), -1)))
        np.testing.assert_array_equal(scales, want_scales.numpy())
        np.testing.assert_array_equal(codes, want_codes.numpy())
        tg.close()


def test_capture_smollm2_stable_across_ubatches(smollm2_path):
    layers = (2, 15, 28)
    runs = []
    for n_ubatch in (512, 3):
        tg = Target(smollm2_path, TargetParams(n_ctx=128, n_batch=32, n_ubatch=n_ubatch), capture_layers=layers)
        tokens = tg.tokenize("The capital of France is Paris. The capital of Italy is")
        tg.decode(tokens, 0, all_logits=False)
        runs.append(tg.features().copy())
        tg.close()
    assert runs[0].shape == (len(tokens), 3 * 576)
    assert np.isfinite(runs[0]).all()
    # batch order: a prefix decoded alone gives the same first rows
    assert _rel_err(runs[1], runs[0]) < 2e-2


def test_capture_ways_agree_bit_for_bit(smollm2_path, monkeypatch):
    """llama.cpp's layer-input capture and the eval callback read the same tensors: the same rows, in a prefill split
    into ubatches and in a verification pass."""
    layers, runs = (1, 8, 15, 22, 29), []
    for way in ("layer inputs", "eval callback"):
        if way == "eval callback":
            monkeypatch.setattr(target_module, "LAYER_INPUT_ARCHS", frozenset())
        tg = Target(smollm2_path, TargetParams(n_ctx=256, n_batch=64, n_ubatch=16, n_threads=1), capture_layers=layers)
        assert tg.capture_method == way
        tokens = tg.tokenize("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3)
        tg.decode(tokens, 0, all_logits=False)
        prefill = tg.features().copy()
        tg.decode(tokens[:5], len(tokens), all_logits=True)
        runs.append((prefill, tg.features().copy()))
        tg.close()
    for a, b in zip(*runs):
        assert a.shape[1] == len(layers) * 576 and len(a) > 1
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("way", ["layer inputs", "eval callback"])
def test_capture_layers_are_the_captured_rows(smollm2_path, monkeypatch, way):
    """Capture.layers gives each extracted layer's rows apart, the columns of the interleaved rows bit for bit:
    after one llama_decode with llama.cpp's layer-input capture, where llama.cpp left them (until they are read,
    then the capture's own); after a decode in several llama_decode calls (more tokens than n_batch) or through the
    eval callback, the capture's, every row."""
    if way == "eval callback":
        monkeypatch.setattr(target_module, "LAYER_INPUT_ARCHS", frozenset())
    layers = (2, 15, 28)
    tg = Target(smollm2_path, TargetParams(n_ctx=256, n_batch=32, n_threads=1), capture_layers=layers)
    assert tg.capture_method == way

    def columns(n: int) -> np.ndarray:
        ptrs = tg.capture.layers(n)
        assert len(ptrs) == len(layers)
        return np.concatenate([np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_float)),
                                                     shape=(n, tg.n_embd)) for p in ptrs], axis=1)

    tokens = tg.tokenize("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 4)
    tg.decode(tokens[:20], 0, all_logits=False)
    in_place = tg.capture.layers(20)
    with pytest.raises(NativeError, match="21 feature rows asked for, 20 captured"):
        tg.capture.layers(21)
    got = columns(20).copy()
    np.testing.assert_array_equal(got, tg.features())
    assert (tg.capture.layers(20) == in_place) == (way == "eval callback")  # read: the capture's own since
    np.testing.assert_array_equal(columns(20), got)
    tg.clear()
    assert len(tokens) > 32
    tg.decode(tokens, 0, all_logits=False)
    np.testing.assert_array_equal(columns(len(tokens)), tg.features())
    assert tg.features().shape == (len(tokens), len(layers) * tg.n_embd)
    # one-token passes whose rows are kept (the engine's steps of the target alone): held after the rows before, each
    # pass's rows bit for bit
    n, runs = len(tokens), []
    for keep in (False, True):
        tg.rollback(n - 1, n - 1, [])
        rows = []
        for i, t in enumerate(tokens[-1:] + tokens[:3]):
            tg.decode([t], n - 1 + i, all_logits=False, keep_rows=keep and i > 0)
            rows.append(tg.features().copy())
        runs.append(np.concatenate(rows) if not keep else columns(4))
        assert len(rows[-1]) == (4 if keep else 1)
    np.testing.assert_array_equal(runs[1], runs[0])
    tg.close()


def test_bad_drafters(tiny_target, smollm2_path, tmp_path):
    llama = tiny_target("llama")
    with pytest.raises(NativeError, match="not a DFlash drafter"):
        Drafter(smollm2_path, smollm2_path)
    with pytest.raises(NativeError, match="cannot read GGUF"):
        Drafter(tmp_path / "missing.gguf", smollm2_path)
    for_smol = random_drafter_gguf(smollm2_path, tmp_path / "smol.gguf", n_layer=1, target_layer_ids=[1, 2])
    with pytest.raises(NativeError, match="hidden size"):
        Drafter(for_smol, llama)
    # same hidden size, another vocabulary
    wide = write_tiny_target("llama", tmp_path / "wide.gguf", n_embd=576, n_head=9, n_head_kv=3)
    with pytest.raises(NativeError, match="vocabulary"):
        Drafter(for_smol, wide)
    # layers deeper than the target
    deep = write_tiny_target("llama", tmp_path / "deep.gguf", n_layer=8)
    deep_drafter = random_drafter_gguf(deep, tmp_path / "deep-d.gguf", n_layer=1, target_layer_ids=[1, 6])
    with pytest.raises(NativeError, match="outside the target"):
        Drafter(deep_drafter, llama)
