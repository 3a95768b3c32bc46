"""What each draft-length choice costs, measured before the first step, and what acceptance earlier runs saw.

Both are kept in the user's cache (cache.py): the costs per machine, target, drafter and settings, so that no run,
however short, pays for learning them (measuring takes a few dozen passes once); the acceptance per target, drafter
and block size, as the prior of the next run's policy (draft_length.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dflash_local import __version__
from dflash_local.cache import read_json, write_json
from dflash_local.draft_length import Choice
from dflash_local.model_registry import MODELS
from dflash_local.models import SHIPPED_DRAFTERS
from dflash_local.sampling import SamplingParams
from dflash_local.tree import N_TOP, build_tree

if TYPE_CHECKING:
    from dflash_local.native import Drafter
    from dflash_local.target import Target

REPEATS = 3  # timed runs of each choice, after one to warm up; the median is kept
METHOD = 2  # how steps are timed (2: greedy picks in the graph, as the engine verifies); costs timed otherwise are stale
CONTEXT = 32  # positions of context the passes attend to while measured (fewer in a small context)


def step_costs(tg: Target, dr: Drafter, block_size: int, choices: list[Choice]) -> dict[Choice, float]:
    """Seconds a step of each choice takes (drafter pass, target pass, rollback), from the cache or measured now."""
    key = _key(tg, dr, block_size, "costs", METHOD, platform.node(), platform.machine(), tg.n_threads,
               tg.params.n_gpu_layers, dr.device, dr.n_threads)
    cached = read_json("calibration.json").get(key, {})
    if all(c.key in cached for c in choices):
        return {c: cached[c.key] for c in choices}
    costs = measure(tg, dr, block_size, choices)
    doc = read_json("calibration.json")
    doc[key] = {c.key: t for c, t in costs.items()}
    write_json("calibration.json", doc)
    return costs


def measure(tg: Target, dr: Drafter, block_size: int, choices: list[Choice]) -> dict[Choice, float]:
    """Each choice's step, as the engine takes it (greedy picks in the graph where llama.cpp can: no rows of logits to
    the host), after CONTEXT positions of a made-up prompt; both caches are cleared afterwards."""
    pos = max(min(CONTEXT, tg.n_ctx // 2), 1)  # a short context fits a block after it; a pass that does not fit
    room = min(tg.n_ctx - pos, tg.n_batch)  # ... is never chosen (cost: infinite)
    tokens = (tg.tokenize("def measure(x):\n    return x * 2\n", add_special=False) or [0]) * (pos + 64)
    tg.clear()
    dr.crop(0)
    tg.decode(tokens[:pos], 0, all_logits=False)
    tg.inject_rows(dr, pos, 0)
    anchor = tokens[pos]
    depth = block_size - 1

    # a step that drafted also injects its rows into the drafter (at most a chain's k + 1: all accepted); the target
    # alone's wait for the next draft, in one pass
    def chain(k: int) -> None:
        if k:
            dr.draft(anchor, block_size, k)
        if k and tg.recurrent and not tg.snapshots:
            tg.save_state()
        tg.decode(tokens[pos:pos + k + 1], pos, all_logits=True)
        if k:
            tg.inject_rows(dr, k + 1, pos)
            dr.crop(pos)
        tg.rollback(pos, pos, [])

    def tree(k: int) -> None:
        ids, probs = dr.draft_top(anchor, N_TOP, block_size, depth)
        t = build_tree(ids, probs, k)
        tg.decode_tree([anchor, *t.tokens], t.depths, t.seqs, pos)
        tg.inject_path(dr, list(range(min(k, depth) + 1)), pos)  # as many rows as the longest path (their cost)
        dr.crop(pos)
        tg.keep_branch(pos, [], len(t.seqs[0]))

    costs: dict[Choice, float] = {}
    tg.pick_on_device(SamplingParams())
    try:
        for c in sorted(choices):  # the target alone first, then each kind from small to big
            smaller = [costs[s] for s in costs if s.tree == c.tree and s.k]
            if c.k + 1 > room:
                costs[c] = math.inf
            elif smaller and smaller[-1] >= (1 + min(c.k, depth)) * costs[Choice(False, 0)]:
                # a smaller one cannot beat the target alone even if all its drafts were accepted: nor can this one,
                # which costs at least as much (on a CPU a tree of 62 takes some 20 one-token passes to measure)
                costs[c] = smaller[-1]
            else:
                costs[c] = median_seconds(lambda c=c: tree(c.k) if c.tree else chain(c.k))
        return costs
    finally:
        tg.pick_on_device(None)
        tg.clear()
        dr.crop(0)


def median_seconds(step: Callable[[], object], repeats: int = REPEATS,
                   after: Callable[[], object] | None = None) -> float:
    """The median time of step over `repeats` runs, after one to warm up; after (untimed) follows each run."""
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t)
        if after:
            after()
    return statistics.median(times)


def load_acceptance(tg: Target, dr: Drafter, block_size: int) -> dict[Choice, tuple[float, float]]:
    """(steps, drafts accepted) per choice that earlier runs with this target, drafter and block size recorded; before
    any, a built-in model's shipped drafter's as measured for the project (its chains)."""
    doc = read_json("acceptance.json").get(_acceptance_key(tg, dr, block_size))
    if doc is None:
        return _shipped_acceptance(tg, dr, block_size)
    out = {}
    for name, (seen, gained) in doc.items():
        kind, k = name.split("-")
        out[Choice(kind == "tree", int(k))] = (seen, gained)
    return out


def _shipped_acceptance(tg: Target, dr: Drafter, block_size: int) -> dict[Choice, tuple[float, float]]:
    """(steps, drafts accepted) from the histograms of a built-in model's shipped drafter, where this is that drafter
    with its model (by the target's size) at block 16, where they were measured: each tree measured, and every chain
    (a chain of k accepts what the chain of 15 accepted, up to k; the policy keeps the lengths it chooses from)."""
    model = next((m for m in MODELS.values() if m.drafter_accepts and tg.path.stat().st_size == m.size
                  and dr.path.resolve() == (SHIPPED_DRAFTERS / m.drafter).resolve()), None)
    if model is None or block_size != 16 or dr.acceptance_key:
        return {}
    prior = {}
    for name, hist in model.drafter_accepts:
        kind, drafts = name.split("-")
        lengths = range(1, int(drafts) + 1) if kind == "chain" else (int(drafts),)
        for c in (Choice(kind == "tree", k) for k in lengths):
            prior[c] = (sum(hist), sum(min(a, c.k) * n for a, n in enumerate(hist)))
    return prior


def save_acceptance(tg: Target, dr: Drafter, block_size: int, acceptance: dict[Choice, tuple[float, float]]) -> None:
    doc = read_json("acceptance.json")
    doc[_acceptance_key(tg, dr, block_size)] = {c.key: list(v) for c, v in acceptance.items()}
    write_json("acceptance.json", doc)


def _acceptance_key(tg: Target, dr: Drafter, block_size: int) -> str:
    # an emulated drafter (bench/emulate.py) accepts what its profile says, never what the real one learnt
    return _key(tg, dr, block_size, "acceptance", *([dr.acceptance_key] if dr.acceptance_key else []))


def _key(tg: Target, dr: Drafter, block_size: int, *more: object) -> str:
    """The files (path, size, modification time), the block size and whatever else the cached value depends on."""
    parts = [__version__, block_size, *more]
    for path in (tg.path, dr.path):
        st = path.stat()
        parts += [str(path.resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
