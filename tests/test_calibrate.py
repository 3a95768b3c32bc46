"""The draft-length policy's inputs: step costs measured once and cached, acceptance carried to the next run."""

from __future__ import annotations

import math

import pytest
from synthetic_drafters import random_drafter_gguf

from dflash_local import calibrate
from dflash_local.draft_length import Choice, choices_for
from dflash_local.engine import Engine
from dflash_local.model_registry import SMOLLM2
from dflash_local.models import shipped_drafter
from dflash_local.native import Drafter
from dflash_local.target import Target, TargetParams
from dflash_local.tree import TREE_SIZE


@pytest.fixture()
def models(tiny_target, tmp_path):
    path = tiny_target("llama")
    drafter = Drafter(random_drafter_gguf(path, tmp_path / "d.gguf", n_layer=1), path, n_ctx=512 + 64, n_threads=1)
    target = Target(path, TargetParams(n_ctx=512, n_threads=1), capture_layers=drafter.info.target_layers,
                    rollback=16, branches=TREE_SIZE)
    yield target, drafter
    drafter.close()
    target.close()


def test_costs_are_measured_once_then_read_from_the_cache(models, monkeypatch):
    tg, dr = models
    choices = choices_for(15, TREE_SIZE)
    costs = calibrate.step_costs(tg, dr, 16, choices)
    assert set(costs) == set(choices) and all(0 < t < math.inf for t in costs.values())
    assert dr.n_pos == 0, "the drafter's cache is left empty"

    def no_measuring(*args: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "measure", no_measuring)
    assert calibrate.step_costs(tg, dr, 16, choices) == costs
    with pytest.raises(AssertionError, match="measured again"):  # other settings: another key
        calibrate.step_costs(tg, dr, 8, choices_for(7, TREE_SIZE))


def test_a_pass_that_does_not_fit_the_context_is_never_chosen(tiny_target, tmp_path):
    path = tiny_target("llama")
    dr = Drafter(random_drafter_gguf(path, tmp_path / "d.gguf", n_layer=1), path, n_ctx=64, n_threads=1)
    tg = Target(path, TargetParams(n_ctx=32, n_threads=1), capture_layers=dr.info.target_layers, rollback=16,
                branches=TREE_SIZE)
    try:
        costs = calibrate.measure(tg, dr, 16, choices_for(15, tg.branches))
        room = min(tg.n_ctx - max(min(calibrate.CONTEXT, tg.n_ctx // 2), 1), tg.n_batch)
        assert any(c.k + 1 > room for c in costs), "the test wants a pass that does not fit"
        assert all((costs[c] == math.inf) == (c.k + 1 > room) for c in costs)
        assert costs[Choice(False, 0)] < math.inf
    finally:
        dr.close()
        tg.close()


def test_acceptance_is_carried_to_the_next_engine(models):
    tg, dr = models
    prompt = tg.tokenize("Once upon a time")
    first = Engine(tg, dr, 16)
    for _ in range(40):  # as if it had drafted chains of 3 before, each accepting 2
        first.policy.record(Choice(False, 3), [1, 2], 1e-3, tried=False)
    first.generate(prompt, 24)
    saved = calibrate.load_acceptance(tg, dr, 16)
    assert saved == first.policy.acceptance() and saved[Choice(False, 3)][0] >= 40
    second = Engine(tg, dr, 16)
    assert second.policy.seen[Choice(False, 3)] == 32, "weighted as at most PRIOR_STEPS steps"
    assert second.policy.gained[Choice(False, 3)] / 32 == pytest.approx(saved[Choice(False, 3)][1] / saved[Choice(False, 3)][0])


def test_a_shipped_drafters_first_run_starts_from_its_measured_acceptance(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE", str(tmp_path))  # a first run: no acceptance cached
    drafter = shipped_drafter(SMOLLM2)
    dr = Drafter(drafter, smollm2_path, n_ctx=256, n_threads=1)
    tg = Target(smollm2_path, TargetParams(n_ctx=128, n_threads=1), capture_layers=dr.info.target_layers)
    try:
        prior = calibrate.load_acceptance(tg, dr, 16)
        chain, tree15, tree62 = (hist for _, hist in SMOLLM2.drafter_accepts)
        assert prior[Choice(False, 15)] == (sum(chain), sum(a * n for a, n in enumerate(chain)))
        assert prior[Choice(False, 1)] == (sum(chain), sum(chain[1:])), "a chain of 1 accepts where 15 accept any"
        assert prior[Choice(True, 62)] == (sum(tree62), sum(a * n for a, n in enumerate(tree62)))
        assert Choice(True, 31) not in prior, "never measured"
        assert calibrate.load_acceptance(tg, dr, 8) == {}, "measured at block 16 only"
        calibrate.save_acceptance(tg, dr, 16, {Choice(False, 3): (5.0, 1.0)})
        assert calibrate.load_acceptance(tg, dr, 16) == {Choice(False, 3): (5.0, 1.0)}, "then what runs learnt"
    finally:
        dr.close()
        tg.close()
