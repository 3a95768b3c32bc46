"""The test models: tiny random targets of every arch and SmolLM2 load and generate in llama.cpp,
and the torch reference of the llama target agrees with llama.cpp."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

import target_reference
from llama_helpers import EXACT, decode, detokenize, greedy, load, logits, tokenize
from tiny_targets import ARCHS, BOS_ID, GEMMA3_SWA, N_VOCAB, UNK_ID, VOCAB, write_tiny_target

from dflash_local.errors import UserError
from dflash_local.sampling import SamplingParams
from dflash_local.target import Target, TargetParams, read_gguf_arch
from dflash_local.tree import TREE_SIZE

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def _meta(model: llama_cpp.llama_model_p, key: str) -> str:
    buf = ctypes.create_string_buffer(128)
    llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode()


def test_vocab_round_trips(tiny_target: Callable[..., Path]) -> None:
    with load(tiny_target("llama")) as (model, _):
        for text in (PROMPT, "Ünïcödé & symbols: 1+1=2 ✓\nnew line"):
            tokens = tokenize(model, text)
            assert tokens[0] == BOS_ID and UNK_ID not in tokens
            assert detokenize(model, tokens[1:]) == text
        # whole words come out as one piece: the merges work
        assert tokenize(model, "the", add_bos=False) == [VOCAB[0].index("▁the")]
        vocab = llama_cpp.llama_model_get_vocab(model)
        buf = ctypes.create_string_buffer(32)
        for tid, (piece, kind) in enumerate(zip(VOCAB[0], VOCAB[2])):
            n = llama_cpp.llama_token_to_piece(vocab, tid, buf, len(buf), 0, False)
            if kind == gguf.TokenType.BYTE:
                assert buf.raw[:n] == bytes([int(piece[3:5], 16)])
            elif kind == gguf.TokenType.NORMAL:
                assert buf.raw[:n] == piece.replace("▁", " ").encode()


def test_tiny_target_is_deterministic(tmp_path: Path) -> None:
    a, b, c = (write_tiny_target("qwen35", tmp_path / f"{i}.gguf", seed=s)
               for i, s in enumerate((0, 0, 1)))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 4 << 20


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_target_generates(arch: str, tiny_target: Callable[..., Path]) -> None:
    with load(tiny_target(arch)) as (model, ctx):
        assert _meta(model, "general.architecture") == arch
        assert llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)) == N_VOCAB
        n_swa = GEMMA3_SWA["sliding_window"] if arch == "gemma3" else 0
        assert llama_cpp.llama_model_n_swa(model) == n_swa
        assert llama_cpp.llama_model_is_hybrid(model) == (arch == "qwen35")
        prompt = tokenize(model, PROMPT)
        out = greedy(ctx, model, prompt, 16)
        assert np.isfinite(logits(ctx, model)).all()
        assert greedy(ctx, model, prompt, 16) == out
    assert len(out) == 16 and len(set(out)) >= 8, out  # not stuck on one token


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_reference_matches_llama_cpp(arch: str, tied: bool, tmp_path: Path) -> None:
    path = write_tiny_target(arch, tmp_path / f"{arch}.gguf", tied=tied)
    with load(path, **EXACT) as (model, ctx):
        tokens = tokenize(model, PROMPT + " there was a little fox.")
        decode(ctx, tokens, 0, all_logits=True)
        got = np.stack([logits(ctx, model, i) for i in range(len(tokens))])
    states = target_reference.hidden_states(path, tokens)
    assert len(states) == 5 and all(s.shape == (len(tokens), 64) for s in states)
    want = target_reference.logits(path, tokens)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_read_gguf_arch(tiny_target: Callable[..., Path], tmp_path: Path) -> None:
    assert [read_gguf_arch(tiny_target(arch)) for arch in ARCHS] == list(ARCHS)
    w = gguf.GGUFWriter(tmp_path / "late.gguf", "qwen2")
    w.kv_data[0].clear()  # general.architecture last, after keys of each kind the reader skips
    w.add_array("a.strings", ["x", "yz"])
    w.add_array("a.nested", [[1, 2], [3]])
    w.add_array("a.floats", [1.5, 2.5])
    w.add_string("a.string", "hello")
    w.add_bool("a.bool", True)
    w.add_float64("a.f64", 1.0)
    w.add_architecture()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert read_gguf_arch(tmp_path / "late.gguf") == "qwen2"
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "late.gguf").read_bytes()[:60])
    with pytest.raises(UserError, match="cut.gguf is not a valid GGUF file"):
        read_gguf_arch(tmp_path / "cut.gguf")


def test_smollm2_generates(smollm2_path: Path) -> None:
    with load(smollm2_path) as (model, ctx):
        assert _meta(model, "general.architecture") == "llama"
        prompt = tokenize(model, "The capital of France is")
        out = greedy(ctx, model, prompt, 16)
        assert greedy(ctx, model, prompt, 16) == out
        assert np.isfinite(logits(ctx, model)).all()
        assert "Paris" in detokenize(model, out)


@pytest.mark.parametrize("arch", [*ARCHS, "smollm2"])
def test_greedy_picks_in_the_graph_are_each_rows_argmax(arch: str, request: pytest.FixtureRequest) -> None:
    """Target.pick_on_device's greedy pick (native/greedy.cpp: one two-stage argmax over all of a pass's rows; the tiny
    vocabulary of 508 in 4 chunks, SmolLM2's 49,152 in 192) is each row's argmax as numpy takes it."""
    path = request.getfixturevalue("smollm2_path") if arch == "smollm2" else request.getfixturevalue("tiny_target")(arch)
    tg = Target(path, TargetParams(n_ctx=256, n_threads=1), capture_layers=(1,))  # a drafter's target: 63 rows a pass
    try:
        tokens = tg.tokenize(PROMPT)
        rows = tg.decode(tokens, 0, all_logits=True).copy()
        tg.clear()
        assert tg.pick_on_device(SamplingParams())
        tg.decode(tokens, 0, all_logits=True)
        picks = tg.picks(len(tokens))
    finally:
        tg.close()
    assert len(tokens) > 8 and picks.tolist() == rows.argmax(axis=1).tolist()


def test_a_trees_rows_are_picked_in_the_graph(smollm2_path: Path) -> None:
    """Greedy, a tree's branches share sequence 0's argmax sampler: every row of a tree pass, of whichever sequence,
    is picked in the graph (no logits to the host), and each pick is its row's argmax."""
    tg = Target(smollm2_path, TargetParams(n_ctx=256, n_threads=1), capture_layers=(1,), branches=TREE_SIZE)
    prompt = tg.tokenize(PROMPT)
    # the anchor; two children, each with a child of its own: leaves in sequences 0 and 1
    tree = ([prompt[-1], 11, 12, 13, 14], [0, 1, 1, 2, 2], [(0, 1), (0,), (1,), (0,), (1,)])
    try:
        runs = []
        for on_device in (False, True):
            tg.clear()
            assert tg.pick_on_device(SamplingParams() if on_device else None) == on_device
            tg.decode(prompt[:-1], 0, all_logits=False)
            rows = tg.decode_tree(*tree, len(prompt) - 1)
            runs.append(tg.picks(5) if on_device else rows.argmax(axis=1))
    finally:
        tg.close()
    assert runs[1] is not None and runs[1].tolist() == runs[0].tolist()
