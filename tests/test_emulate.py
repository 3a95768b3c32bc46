"""Emulated acceptance (dflash_local/bench/emulate.py): profiles, and a real drafter whose drafts become the target's
own text cut at drawn lengths, so that the engine accepts exactly what was drawn and still gives the target's text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic_drafters import random_drafter_gguf

from dflash_local.bench.emulate import EmulatedDrafter, Profile, geometric, load_profile
from dflash_local.engine import Engine
from dflash_local.errors import UsageError, UserError
from dflash_local.native import Drafter
from dflash_local.synthetic.targets import TargetShape, write_target
from dflash_local.target import Target, TargetParams

PROFILES = Path(__file__).resolve().parents[1] / "bench" / "profiles"
PARAMS = TargetParams(n_ctx=1024, n_threads=1)


def test_geometric_profiles():
    for tau in (1.0, 2.5, 3.4, 7.7, 12.0, 16.0):
        p = geometric(tau)
        assert len(p.hist) == 16 and p.tau == pytest.approx(tau, abs=1e-6) and sum(p.hist) == pytest.approx(1.0)
    assert geometric(1.0).hist[0] == pytest.approx(1.0) and geometric(16.0).hist[-1] == pytest.approx(1.0)
    with pytest.raises(UsageError, match="1 to 16"):
        geometric(17.0)


def test_load_profile(tmp_path):
    for tau in (3.4, 7.7):
        p = load_profile(str(PROFILES / f"tau-{tau:g}.json"))
        assert p.tau == pytest.approx(tau, abs=1e-3) and "synthetic" in p.source
    assert load_profile("tau=5").tau == pytest.approx(5.0)
    result = tmp_path / "bench.json"  # a bench result: its DFlash run of the largest block
    result.write_text(json.dumps({"runs": [
        {"key": "target", "mode": "target", "block_size": None, "accept_hist": []},
        {"key": "dflash-4", "mode": "dflash", "block_size": 4, "accept_hist": [1, 0, 0, 9]},
        {"key": "dflash-16", "mode": "dflash", "block_size": 16, "accept_hist": [3, 1] + [0] * 13 + [1]}]}))
    p = load_profile(str(result))
    assert p.tau == pytest.approx(1 + (1 + 15) / 5) and "dflash-16" in p.source
    for bad, message in (("tau=x", "takes a number"), (str(tmp_path / "none.json"), "neither tau=X"),
                         (str(result.with_name("empty.json")), "neither")):
        with pytest.raises(UserError, match=message):
            load_profile(bad)
    result.write_text('{"accept_hist": [1, -1]}')
    with pytest.raises(UserError, match="non-negative"):
        load_profile(str(result))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama in Q8_0, whose passes of several tokens give a one-token pass's logits exactly on a CPU (float32
    and K-quant weights round otherwise, and 400 tokens reach a near-tie)."""
    out = tmp_path_factory.mktemp("emu")
    path = write_target(out / "llama-q8_0.gguf", TargetShape("llama", 4, 64, 192, 4, 2, 16), name="tiny", quant="q8_0")
    return path, random_drafter_gguf(path, out / "d.gguf", n_layer=1)


def _emulated(path: Path, drafter: Path, profile: Profile, block: int = 16):
    dr = Drafter(drafter, path, n_ctx=PARAMS.n_ctx + 64, n_threads=1)
    tg = Target(path, PARAMS, capture_layers=dr.info.target_layers, rollback=dr.info.block_size)
    alone = Target(path, PARAMS, model_of=tg)
    emu = EmulatedDrafter(dr, profile, tg)
    return tg, alone, emu, Engine(tg, emu, block, adaptive=False, tree_size=0)


def _below_cut(emu: EmulatedDrafter, stats) -> list[int]:
    """The passes that accepted less than the length drawn for them, as far as their chain reached."""
    cuts = emu.cuts[-stats.passes:]
    return [i for i, (c, k, a) in enumerate(zip(cuts, stats.drafted, stats.accepted)) if a != min(c, k)]


def test_emulated_acceptance_follows_the_profile(llama):
    tg, alone, emu, eng = _emulated(*llama, geometric(4.0))
    try:
        prompt = tg.tokenize("Once upon a time")
        ref = Engine(alone).generate(prompt, 400)
        assert ref.stop == "length"  # an end of text would cap the last pass's acceptance
        emu.start(prompt, ref.tokens, 16, 400)
        gen = eng.generate(prompt, 400, on_tokens=emu.on_tokens)
        emu.stop()
        assert gen.tokens == ref.tokens  # the target verified as usual
        assert _below_cut(emu, gen.stats) == []
        full = [a for a, k in zip(gen.stats.accepted, gen.stats.drafted) if k == 15]
        assert len(full) > 80 and np.mean(full) == pytest.approx(3.0, abs=0.15)  # the profile's mean drafts accepted
        assert np.mean(emu.cuts) == pytest.approx(3.0, abs=0.2)  # drawn evenly through the profile (at random: +-0.35)
        assert emu.seconds > 0  # each pass's drafts were checked by a trial pass
    finally:
        alone.close()
        tg.close()
        emu.close()


def test_emulated_acceptance_follows_dflash_text_where_it_leaves_the_continuation(llama):
    """As on CUDA, where DFlash's text can leave the target alone's: here the continuation given is wrong from token
    5 on. The trial passes put the target's own tokens in its place: every pass accepts what was drawn for it."""
    tg, alone, emu, eng = _emulated(*llama, geometric(8.0))
    try:
        prompt = tg.tokenize("Once upon a time")
        ref = Engine(alone).generate(prompt, 60)
        wrong = ref.tokens[:5] + [(t + 1) % tg.n_vocab for t in ref.tokens[5:]]
        emu.start(prompt, wrong, 16, 60)
        gen = eng.generate(prompt, 60, on_tokens=emu.on_tokens)
        emu.stop()
        assert gen.tokens == ref.tokens
        assert _below_cut(emu, gen.stats) == []
        assert gen.stats.tau > 3
    finally:
        alone.close()
        tg.close()
        emu.close()


def test_emulated_acceptance_on_a_hybrid_target(tiny_target, tmp_path):
    path = tiny_target("qwen35")
    tg, alone, emu, eng = _emulated(path, random_drafter_gguf(path, tmp_path / "d.gguf"), geometric(6.0), block=8)
    try:
        assert tg.snapshots
        prompt = tg.tokenize("The quick brown fox")
        ref = Engine(alone).generate(prompt, 80)
        emu.start(prompt, ref.tokens, 8, 80)
        gen = eng.generate(prompt, 80, on_tokens=emu.on_tokens)
        emu.stop()
        assert gen.tokens == ref.tokens
        assert _below_cut(emu, gen.stats) == []
        assert min(gen.stats.accepted) < 7 and max(gen.stats.accepted) >= 3  # rollbacks, and long runs accepted
    finally:
        alone.close()
        tg.close()
        emu.close()
