"""Lossless, as a property: for random combinations of prompt, block size, tree size, adaptive draft length and
length, at temperature 0 and one thread, DFlash with a random native drafter generates what an independent greedy
loop straight on llama.cpp (llama_helpers.greedy, none of our engine) generates on the same tiny target.

Up to ties: llama.cpp's logits of a token decoded in a batch (as drafts are verified) differ from those of the same
token decoded alone in the last digits (up to 0.007 here, with f16 or f32 KV cache alike), so where the greedy
loop's two best tokens are closer than that, either is the target's choice and the outputs part ways there.

DFLASH_PROPERTY_CASES (combinations per architecture, default 60) and DFLASH_PROPERTY_SEED (default 0) explore
further; a failure names the seed and the combination.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
from llama_helpers import greedy, load
from synthetic_drafters import random_drafter_gguf
from tiny_targets import ARCHS, BOS_ID, N_VOCAB

from dflash_local.engine import Engine
from dflash_local.native import Drafter
from dflash_local.target import Target, TargetParams
from dflash_local.tree import TREE_SIZE

N_CASES = int(os.environ.get("DFLASH_PROPERTY_CASES", 60))
SEED = int(os.environ.get("DFLASH_PROPERTY_SEED", 0))
PARAMS = TargetParams(n_ctx=256, n_batch=256, n_threads=1)
FIRST_TEXT_TOKEN = 4  # after the special tokens (tiny_targets)
TIE = 0.02  # logits closer than this are a tie (a few times the batch-vs-alone differences seen)
MAX_TIES = 0.2  # of the combinations: more would say that the outputs part ways for another reason


@dataclass(frozen=True)
class Case:
    prompt: tuple[int, ...]
    block_size: int
    tree_size: int
    adaptive: bool
    max_tokens: int


def random_case(rng: random.Random, trained_block_size: int) -> Case:
    prompt = (BOS_ID, *(rng.randrange(FIRST_TEXT_TOKEN, N_VOCAB) for _ in range(rng.randint(1, 24))))
    return Case(prompt=prompt, block_size=rng.randint(2, trained_block_size),
                tree_size=rng.choice([0, rng.randint(1, 15), rng.randint(16, TREE_SIZE), TREE_SIZE]),
                adaptive=rng.random() < 0.5, max_tokens=rng.randint(1, 48))


@pytest.mark.parametrize("arch", ARCHS)
def test_dflash_equals_greedy_llama_cpp(arch, tiny_target, tmp_path, capsys):
    path = tiny_target(arch)
    rng = random.Random(f"{SEED}-{arch}")
    drafter_path = random_drafter_gguf(path, tmp_path / "drafter.gguf", n_layer=rng.randint(1, 2),
                                       seed=rng.randrange(1000))
    dr = Drafter(drafter_path, path, n_ctx=PARAMS.n_ctx + 64, n_threads=1)
    tg = Target(path, PARAMS, capture_layers=dr.info.target_layers, rollback=dr.info.block_size, branches=TREE_SIZE)
    cases = [random_case(rng, dr.info.block_size) for _ in range(N_CASES)]
    drafted, ties = 0, 0
    try:
        with load(path, n_ctx=PARAMS.n_ctx, n_batch=PARAMS.n_batch, n_ubatch=PARAMS.n_batch) as (model, ctx):
            for i, case in enumerate(cases):
                rows: list[np.ndarray] = []
                want = greedy(ctx, model, list(case.prompt), case.max_tokens, rows)
                got = Engine(tg, dr, case.block_size, adaptive=case.adaptive,
                             tree_size=case.tree_size).generate(list(case.prompt), case.max_tokens)
                drafted += sum(got.stats.drafted)
                where = f"{arch}, DFLASH_PROPERTY_SEED={SEED}, case {i}: {case}\n got  {got.tokens}\n want {want}"
                n = len(got.tokens)
                part = next((j for j in range(n) if got.tokens[j] != want[j]), None)
                if part is not None:
                    gap = rows[part][want[part]] - rows[part][got.tokens[part]]
                    assert gap < TIE, f"{where}\nthey part at {part}, where the logits differ by {gap:.4f}"
                    ties += 1
                    continue
                # short of max_tokens where the target ends: the reference goes on past an end token
                assert n == len(want) or (got.stop == "eog" and tg.is_eog(want[n])), where
    finally:
        tg.close()
        dr.close()
    with capsys.disabled():
        print(f"\nproperty ({arch}, seed {SEED}): {len(cases)} combinations equal to greedy llama.cpp ({ties} up to a "
              f"tie), {drafted} drafts verified")
    assert drafted > 0, "the cases should verify drafts"
    assert ties <= MAX_TIES * len(cases)
