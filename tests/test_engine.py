"""Lossless decoding: DFlash output equals the target's own output (greedy: token for token; sampled:
the same distribution), on SmolLM2 and on tiny random targets of every supported architecture.

Two kinds of drafters run: real random drafters on the native helper (their drafts are almost always
rejected), and an oracle that proposes the target's own continuation with planted mistakes, so that long
acceptances and rollbacks of several tokens (recurrent state included) run too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_drafters import random_drafter_gguf
from tiny_targets import ARCHS

from dflash_local import engine as engine_module
from dflash_local import target as target_module
from dflash_local.draft_length import Choice
from dflash_local.engine import Engine
from dflash_local.models import SHIPPED_DRAFTERS
from dflash_local.native import Drafter, DrafterInfo, NativeError
from dflash_local.sampling import SamplingParams, target_probs
from dflash_local.target import Target, TargetParams
from dflash_local.tree import TREE_SIZE

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
N_TOKENS = 40
PARAMS = TargetParams(n_ctx=512, n_batch=512, n_threads=1)


class OracleDrafter:
    """Drafts the target's own greedy continuation, wrong at scattered positions (about one in `miss`),
    so the engine sees full acceptances, partial ones and rejections at many offsets of the block."""

    def __init__(self, continuation: list[int], prompt_len: int, block_size: int, miss: int = 8):
        self.continuation, self.prompt_len, self.miss = continuation, prompt_len, miss
        self.info = DrafterInfo(n_embd=0, n_vocab=0, n_layer=0, n_head=0, n_head_kv=0, head_dim=0, n_ff=0,
                                block_size=block_size, mask_token_id=0, n_ctx=1 << 30, target_layers=(1,))
        self.n_pos = 0

    def crop(self, n_pos: int) -> None:
        self.n_pos = min(self.n_pos, n_pos)

    def inject(self, features: np.ndarray, pos0: int) -> None:
        assert pos0 == self.n_pos or pos0 == 0, "features must continue the drafter's context"
        assert np.isfinite(features).all()
        self.n_pos = pos0 + len(features)

    def inject_layers(self, layers: list[int], n: int, pos0: int) -> None:
        assert pos0 == self.n_pos or pos0 == 0, "features must continue the drafter's context"
        assert layers and all(layers)
        self.n_pos = pos0 + n

    def inject_gather(self, layers: list[int], n_held: int, rows: list[int], pos0: int) -> None:
        assert all(0 <= r < n_held for r in rows)
        self.inject_layers(layers, len(rows), pos0)

    def draft(self, anchor: int, block_size: int, n: int | None = None) -> np.ndarray:
        return self.draft_top(anchor, 1, block_size, n)[0][:, 0]

    def draft_top(self, anchor: int, n_top: int, block_size: int,
                  n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For a tree: where the first choice is wrong the second is right, so paths leave the first chain."""
        start = self.n_pos - self.prompt_len + 1  # index of the token after the anchor
        ids = []
        for i in range(start, start + (n or block_size - 1)):
            tok = self.continuation[i] if i < len(self.continuation) else 0
            wrong = (i * 2654435761) % 1000 < 1000 // self.miss
            first = (tok + 1) % 7 if wrong else tok
            others = [t for t in (tok, 7, 8, 9, 10) if t != first]
            ids.append([first, *others][:n_top])
        probs = np.array([0.6, 0.3, 0.06, 0.04])[:n_top]
        return np.array(ids, dtype=np.int32), np.tile(probs, (len(ids), 1))


def target_only(path: Path, prompt: list[int], n: int, params: TargetParams = PARAMS) -> list[int]:
    tg = Target(path, params)
    try:
        return Engine(tg).generate(prompt, n).tokens
    finally:
        tg.close()


@pytest.fixture(scope="module")
def drafters(tmp_path_factory, tiny_target):
    """A random native drafter per architecture (2 layers, trained block size 16)."""
    out = tmp_path_factory.mktemp("drafters")
    return {arch: random_drafter_gguf(tiny_target(arch), out / f"{arch}.gguf", n_layer=2) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_random_drafter(arch, tiny_target, drafters):
    path = tiny_target(arch)
    dr = Drafter(drafters[arch], path, n_ctx=PARAMS.n_ctx + 64, n_threads=1)
    tg = Target(path, PARAMS, capture_layers=dr.info.target_layers, rollback=dr.info.block_size,
                branches=TREE_SIZE)
    assert (tg.branches > 0) != tg.recurrent, "trees of drafts on attention models"
    for prompt_text in PROMPTS:
        prompt = tg.tokenize(prompt_text)
        expected = target_only(path, prompt, N_TOKENS)
        assert len(set(expected)) > 3, "the tiny target should not generate one token forever"
        for block in (2, 4, 16):
            for tree_size in (0, 15, TREE_SIZE):
                got = Engine(tg, dr, block, adaptive=False, tree_size=tree_size).generate(prompt, N_TOKENS)
                assert got.tokens == expected, f"{arch} block {block} tree {tree_size}: {prompt_text!r}"
                assert got.stats.passes > 0
        # the adaptive draft length changes how much is verified, never what is generated
        assert Engine(tg, dr, 16).generate(prompt, N_TOKENS).tokens == expected
    tg.close()
    dr.close()


def test_a_generation_where_no_draft_could_pay_runs_the_target_alone_uncaptured(tiny_target, drafters):
    path = tiny_target("llama")
    dr = Drafter(drafters["llama"], path, n_ctx=PARAMS.n_ctx + 64, n_threads=1)
    tg = Target(path, PARAMS, capture_layers=dr.info.target_layers, rollback=dr.info.block_size)
    try:
        prompt = tg.tokenize(PROMPTS[1])
        engine = Engine(tg, dr, 16)
        policy = engine.policy
        for c in policy.choices:  # each draft costs a one-token pass, and in 100 steps of each none was accepted
            policy.cost[c] = policy.calibrated[c] = 1e-3 * (1 + c.k)
            if c.k:
                policy.seen[c], policy.gained[c], policy.steps[c], policy.whole[c] = 100, 0, 100, 0
        assert not policy.could_draft(15, engine.tree_size)
        got = engine.generate(prompt, N_TOKENS)
        assert got.tokens == target_only(path, prompt, N_TOKENS)
        assert set(got.stats.drafted) == {0} and got.stats.t_capture == 0 and dr.n_pos == 0, "nothing captured"
        assert tg.capture.enabled, "the capture is on again for the next generation"
    finally:
        dr.close()
        tg.close()


@pytest.mark.parametrize("arch,snapshots,branches", [(arch, True, 0) for arch in ARCHS] + [("qwen35", False, 0)]
                         + [(arch, True, TREE_SIZE) for arch in ARCHS if arch != "qwen35"])
def test_identity_long_acceptance(arch, snapshots, branches, tiny_target):
    """Oracle drafts: long accepted runs and rollbacks of up to 15 tokens. For the hybrid arch, both
    rollback mechanisms: llama.cpp's recurrent snapshots and our saved-state restore. With branches, trees of
    drafts whose accepted paths leave the first chain where its token is wrong."""
    path = tiny_target(arch)
    tg = Target(path, PARAMS, capture_layers=(1,), rollback=16 if snapshots else 0, branches=branches)
    assert tg.snapshots == (tg.recurrent and snapshots)
    for prompt_text in PROMPTS:
        prompt = tg.tokenize(prompt_text)
        expected = target_only(path, prompt, N_TOKENS)
        for block in (2, 4, 16):
            oracle = OracleDrafter(expected, len(prompt), block)
            got = Engine(tg, oracle, block, adaptive=False).generate(prompt, N_TOKENS)
            assert got.tokens == expected, f"{arch} block {block}: {prompt_text!r}"
            if block == 16:
                assert max(got.stats.accepted) >= 3, "the oracle should get runs accepted"
                assert min(got.stats.accepted) < 3
    tg.close()


class AloneThreeStepsOfFour:
    """A draft-length policy that has the target run alone three steps of every four, then drafts the whole chain."""

    def __init__(self):
        self.steps = 0

    def could_draft(self, max_chain: int, max_tree: int) -> bool:
        return True

    def choose(self, max_chain: int, max_tree: int) -> tuple[Choice, bool]:
        self.steps += 1
        return Choice(False, max_chain if self.steps % 4 == 0 else 0), False

    def record(self, *_) -> None:
        pass

    def acceptance(self) -> None:
        return None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama.cpp's layer-input capture, the eval callback
def test_rows_of_steps_the_target_ran_alone_reach_the_drafter_in_one_pass(arch, tiny_target, monkeypatch):
    """While the target runs alone, each step's feature row waits in the capture (Target.decode's keep_rows), and
    the rows of those steps go into the drafter in one injection when drafting resumes, at the positions they hold
    (the oracle checks that each injection continues its context, and drafts from where it stands)."""
    path = tiny_target(arch)
    tg = Target(path, PARAMS, capture_layers=(1,), rollback=16)
    prompt = tg.tokenize(PROMPTS[2])
    expected = target_only(path, prompt, 64)
    oracle = OracleDrafter(expected, len(prompt), 16)
    injected: list[int] = []
    inject_layers = oracle.inject_layers
    monkeypatch.setattr(oracle, "inject_layers",
                        lambda layers, n, pos: injected.append(n) or inject_layers(layers, n, pos))
    monkeypatch.setattr(engine_module.calibrate, "save_acceptance", lambda *_: None)
    engine = Engine(tg, oracle, 16, adaptive=False)
    engine.policy = AloneThreeStepsOfFour()
    got = engine.generate(prompt, 64)
    assert got.tokens == expected
    assert got.stats.drafted[:4] == [0, 0, 0, 15] and max(got.stats.accepted) >= 3
    drafting = [i for i, k in enumerate(got.stats.drafted) if k]
    assert injected == [len(prompt)] + [n for i in drafting for n in (3, got.stats.accepted[i] + 1)][:len(injected) - 1]
    tg.close()


def test_identity_smollm2(smollm2_path, tmp_path):
    drafter = random_drafter_gguf(smollm2_path, tmp_path / "smol-dflash.gguf", n_layer=1)
    dr = Drafter(drafter, smollm2_path, n_ctx=PARAMS.n_ctx + 64, n_threads=1)
    tg = Target(smollm2_path, PARAMS, capture_layers=dr.info.target_layers, rollback=16, branches=TREE_SIZE)
    for prompt_text in PROMPTS[:2]:
        prompt = tg.tokenize(tg.chat_prompt([("user", prompt_text)]))
        expected = target_only(smollm2_path, prompt, 24)
        for block in (4, 16):
            assert Engine(tg, dr, block).generate(prompt, 24).tokens == expected
        oracle = OracleDrafter(expected, len(prompt), 16)
        got = Engine(tg, oracle, 16, adaptive=False).generate(prompt, 24)
        assert got.tokens == expected
        assert got.stats.tau > 2.0
    tg.close()
    dr.close()


def test_drafts_copied_from_the_context_are_accepted_beside_a_random_drafters(smollm2_path, tmp_path):
    """Where the target writes again what its context holds, a copy of it (dflash_local/lookup.py) is accepted whole,
    as a chain and in a tree, where a random drafter's own drafts are rejected; the output stays the target's own."""
    drafter = random_drafter_gguf(smollm2_path, tmp_path / "smol-dflash.gguf", n_layer=1)
    dr = Drafter(drafter, smollm2_path, n_ctx=PARAMS.n_ctx + 64, n_threads=1)
    tg = Target(smollm2_path, PARAMS, capture_layers=dr.info.target_layers, rollback=16, branches=TREE_SIZE)
    try:
        prompt = tg.tokenize("one two three four five six seven eight nine ten, " * 3)
        expected = target_only(smollm2_path, prompt, 48)
        for tree_size in (0, 15):
            got = Engine(tg, dr, 16, adaptive=False, tree_size=tree_size).generate(prompt, 48)
            assert got.tokens == expected
            assert sum(a >= 7 for a in got.stats.accepted) >= 2, (tree_size, got.stats.accepted)  # a period at once
    finally:
        tg.close()
        dr.close()

def test_identity_smollm2_long_context_shipped_drafter(smollm2_path):
    """Past 256 tokens llama.cpp's KV view reaches 512 cells, where ggml's CPU flash attention splits one token's
    attention over threads and rounds differently from a block's (docs/design.md, section 7); with one
    thread they agree, and DFlash with the shipped drafter equals the target alone."""
    params = TargetParams(n_ctx=1024, n_batch=512, n_threads=1)
    dr = Drafter(SHIPPED_DRAFTERS / f"{smollm2_path.stem}-dflash.gguf", smollm2_path, n_ctx=1024 + 64, n_threads=1)
    tg = Target(smollm2_path, params, capture_layers=dr.info.target_layers, rollback=16, branches=TREE_SIZE)
    prompt = tg.tokenize(" ".join(PROMPTS * 40))[:400]
    expected = target_only(smollm2_path, prompt, 64, params)
    for tree_size in (0, 15, TREE_SIZE):
        assert Engine(tg, dr, 16, adaptive=False, tree_size=tree_size).generate(prompt, 64).tokens == expected
    got = Engine(tg, OracleDrafter(expected, len(prompt), 16), 16, adaptive=False).generate(prompt, 64)
    assert got.tokens == expected and got.stats.tau > 2.0
    tg.close()
    dr.close()


@pytest.mark.parametrize("way", ["layer inputs", "eval callback"])
def test_drafter_reads_each_layers_rows_where_they_are(smollm2_path, monkeypatch, way):
    """The prompt's and every drafting step's features go into the drafter each layer's rows apart, from where the
    capture left them (Capture.layers: llama.cpp's own buffers, or the eval callback's), and draft what the
    interleaved rows draft."""
    if way == "eval callback":
        monkeypatch.setattr(target_module, "LAYER_INPUT_ARCHS", frozenset())
    dr = Drafter(SHIPPED_DRAFTERS / f"{smollm2_path.stem}-dflash.gguf", smollm2_path, n_ctx=PARAMS.n_ctx + 64,
                 n_threads=1)
    tg = Target(smollm2_path, PARAMS, capture_layers=dr.info.target_layers)
    assert tg.capture_method == way
    prompt = tg.tokenize(tg.chat_prompt([("user", PROMPTS[1])]))
    rows_read: list[int] = []
    inject_layers = dr.inject_layers
    monkeypatch.setattr(dr, "inject_layers",
                        lambda layers, n, pos: rows_read.append(n) or inject_layers(layers, n, pos))
    direct = Engine(tg, dr, 16, adaptive=False).generate(prompt, 48)
    monkeypatch.setattr(tg, "inject_rows", lambda drafter, n, pos: drafter.inject(tg.features()[:n], pos))
    interleaved = Engine(tg, dr, 16, adaptive=False).generate(prompt, 48)
    assert rows_read == [len(prompt)] + [n + 1 for n in direct.stats.accepted][:len(rows_read) - 1]
    assert len(rows_read) >= len(direct.stats.accepted)  # the last step may draft nothing
    assert direct.stats.accepted == interleaved.stats.accepted and sum(direct.stats.accepted) > 0
    assert direct.tokens == interleaved.tokens
    tg.close()
    dr.close()


@pytest.mark.parametrize("way", ["layer inputs", "eval callback"])
def test_a_trees_path_is_gathered_from_each_layers_rows(smollm2_path, monkeypatch, way):
    """A tree step injects its accepted path's rows picked out of each layer's rows where the capture left them
    (Target.inject_path), and drafts what the interleaved rows of that path draft; a row past those held is an
    error, not a read past them."""
    if way == "eval callback":
        monkeypatch.setattr(target_module, "LAYER_INPUT_ARCHS", frozenset())
    dr = Drafter(SHIPPED_DRAFTERS / f"{smollm2_path.stem}-dflash.gguf", smollm2_path, n_ctx=PARAMS.n_ctx + 64,
                 n_threads=1)
    tg = Target(smollm2_path, PARAMS, capture_layers=dr.info.target_layers, branches=TREE_SIZE)
    prompt = tg.tokenize(tg.chat_prompt([("user", PROMPTS[1])]))
    paths: list[list[int]] = []
    inject_path = tg.inject_path
    monkeypatch.setattr(tg, "inject_path",
                        lambda drafter, rows, pos: paths.append(rows) or inject_path(drafter, rows, pos))
    gathered = Engine(tg, dr, 16, adaptive=False, tree_size=TREE_SIZE).generate(prompt, 48)
    monkeypatch.setattr(tg, "inject_path", lambda drafter, rows, pos: drafter.inject(tg.features()[rows], pos))
    interleaved = Engine(tg, dr, 16, adaptive=False, tree_size=TREE_SIZE).generate(prompt, 48)
    assert [len(p) - 1 for p in paths] == gathered.stats.accepted
    assert any(p != list(range(len(p))) for p in paths)  # some path leaves the tree's first chain
    assert gathered.stats.accepted == interleaved.stats.accepted and gathered.tokens == interleaved.tokens
    tg.clear()
    tg.decode(prompt[:4], 0, all_logits=False)
    with pytest.raises(NativeError, match="row 4 asked for, 4 held"):
        dr.inject_gather(tg.capture.layers(4), 4, [0, 4], 0)
    tg.close()
    dr.close()


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% quantile of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


TOP_K = dict(temperature=1.0, top_k=6)
TOP_P_MIN_P = dict(temperature=0.7, top_p=0.8, min_p=0.05)


@pytest.mark.parametrize("with_drafter,branches,sampling", [(False, 0, TOP_K), (True, 0, TOP_K), (True, TREE_SIZE, TOP_K),
                                                             (True, 0, TOP_P_MIN_P)])
def test_sampling_distribution(with_drafter, branches, sampling, tiny_target):
    """The joint distribution of the first two sampled tokens matches the target's exactly computed one.
    The second token goes through the accept test (or a tree's walk) when a drafter is on. Chains and the target
    alone sample where the model runs (Target.pick_on_device); a tree's rows of other sequences, on the host."""
    path = tiny_target("llama")
    tg = Target(path, PARAMS, capture_layers=(1,), rollback=16, branches=branches)
    prompt = tg.tokenize("The quick brown fox")

    # exact p(t0, t1) = p(t0) p(t1 | t0), from the target's own logits; an end-of-generation t0
    # ends the output, so it is one cell (t0, -1)
    p0 = target_probs(tg.decode(prompt, 0, all_logits=False)[0].copy(), SamplingParams(**sampling))
    expected: dict[tuple[int, int], float] = {}
    for t0 in map(int, np.flatnonzero(p0)):
        if tg.is_eog(t0):
            expected[(t0, -1)] = p0[t0]
            continue
        tg.clear()
        p1 = target_probs(tg.decode([*prompt, t0], 0, all_logits=False)[0].copy(), SamplingParams(**sampling))
        for t1 in map(int, np.flatnonzero(p1)):
            expected[(t0, t1)] = p0[t0] * p1[t1]
    eog = next((t for t in range(tg.n_vocab) if tg.is_eog(t)), -1)

    greedy = target_only(path, prompt, 4)
    counts: dict[tuple[int, int], int] = {}
    n_runs = 1500
    for seed in range(n_runs):
        # 3 tokens: the budget leaves room for one draft after the first token
        drafter = OracleDrafter(greedy, len(prompt), 4, miss=1000) if with_drafter else None
        toks = Engine(tg, drafter, 4 if with_drafter else None, adaptive=False).generate(
            prompt, 3, SamplingParams(**sampling, seed=seed)).tokens
        pair = (toks + [eog])[:2] if toks else [eog, -1]
        counts[tuple(pair)] = counts.get(tuple(pair), 0) + 1
    tg.close()

    assert set(counts) <= set(expected), "sampled a pair the target gives probability 0"
    # pool rare cells so every expected count is >= 5
    keys = sorted(expected, key=expected.get, reverse=True)
    common = [k for k in keys if expected[k] * n_runs >= 5]
    obs = [counts.get(k, 0) for k in common] + [n_runs - sum(counts.get(k, 0) for k in common)]
    exp = [expected[k] * n_runs for k in common] + [n_runs * (1 - sum(expected[k] for k in common))]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    assert stat < _chi2_critical(len(obs) - 1), f"chi-square {stat:.1f} over {len(obs) - 1} dof"


def test_seed_reproducible(tiny_target):
    path = tiny_target("qwen3")
    tg = Target(path, PARAMS)
    prompt = tg.tokenize("Once upon a time")
    runs = [Engine(tg).generate(prompt, 20, SamplingParams(temperature=0.8, seed=7)).tokens for _ in range(2)]
    tg.close()
    assert runs[0] == runs[1]
