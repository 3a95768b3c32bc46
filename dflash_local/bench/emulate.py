"""Emulated acceptance (`dflash bench --emulate-acceptance PROFILE`): what DFlash would gain with a drafter that
accepts as PROFILE says, on targets whose own drafter accepts nothing (random weights, the mission shapes of
bench/shapes.py).

The real drafter still runs every pass, for its cost; its drafts are then replaced by tokens its verification will
pick, cut at an acceptance length n drawn from the profile for the pass: the first n drafts are the target's own
picks and draft n+1 (if any) a wrong one. The target verifies as usual, so the output is the target's own and the
bench's greedy identity check still holds. Chains only: the bench turns trees off.

A pass of several tokens can pick otherwise than one token at a time (a near-tie rounds either way, as random weights
meet at most positions on CUDA), so each pass's drafts are settled before it, outside the steps: the first guess is
the target alone's greedy text of the same prompt (from its run just before) while DFlash's text still agrees with
it; then trial passes of DFlash's own target over the same batch, each undone, replace the drafts from the first one
it would reject on by its own picks there, until the first n are accepted (n + 1 trials at most: each fixes at least
one more). Their time is taken off DFlash's decode time (EmulatedDrafter.seconds), and every pass accepts exactly the
length drawn for it.

The lengths are drawn by a golden-ratio sequence through the profile's distribution rather than independently, so that
even a short run's passes follow the profile closely: over 130 passes of the tau 7.7 profile the mean drawn is off by
0.07 (a standard deviation over starting points), where independent draws would be off by 0.46.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dflash_local.errors import UsageError, UserError

if TYPE_CHECKING:
    from dflash_local.native import Drafter
    from dflash_local.target import Target

MAX_DRAFTS = 15  # a shorthand profile's longest run of accepted drafts: a block of 16
GOLDEN = (5**0.5 - 1) / 2  # the step of the sequence of draws: its points spread evenly over [0, 1) at any length


@dataclass(frozen=True)
class Profile:
    name: str  # as given: a file or "tau=X"
    hist: tuple[float, ...]  # weight of passes by drafts accepted, 0 .. len-1 (the last: all drafts of a block)
    source: str  # where the histogram comes from

    @property
    def tau(self) -> float:
        """Tokens per pass for a block of len(hist): 1 + the mean drafts accepted."""
        return 1.0 + float(np.dot(np.arange(len(self.hist)), self.hist) / np.sum(self.hist))

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "tau": self.tau, "accept_hist": list(self.hist), "source": self.source}


def geometric(tau: float, max_drafts: int = MAX_DRAFTS) -> Profile:
    """Every draft accepted with the same probability a after its predecessor, up to max_drafts: P(n) = a^n (1 - a),
    the rest at max_drafts; a chosen so that the mean is tau - 1 drafts."""
    if not 1.0 <= tau <= 1.0 + max_drafts:
        raise UsageError(f"tau={tau:g}: a block of {max_drafts + 1} gains 1 to {max_drafts + 1} tokens a pass")

    def hist(a: float) -> np.ndarray:
        h = a ** np.arange(max_drafts + 1) * (1.0 - a)
        h[-1] = a**max_drafts
        return h

    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the mean grows with a
        a = (lo + hi) / 2
        mean = float(np.dot(np.arange(max_drafts + 1), hist(a)))
        lo, hi = (a, hi) if mean < tau - 1.0 else (lo, a)
    return Profile(f"tau={tau:g}", tuple(float(x) for x in hist((lo + hi) / 2)),
                   f"geometric: each draft accepted with probability {(lo + hi) / 2:.4f} after its predecessor, "
                   f"up to {max_drafts}")


def load_profile(spec: str) -> Profile:
    """`tau=X` (geometric), or a JSON file: {"accept_hist": [...]} (bench/profiles/), or a `dflash bench --json`
    result, whose DFlash run of the largest block gives its histogram."""
    if spec.startswith("tau="):
        try:
            return geometric(float(spec[4:]))
        except ValueError:
            raise UsageError(f"--emulate-acceptance {spec}: tau=X takes a number") from None
    path = Path(spec)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--emulate-acceptance {spec}: neither tau=X nor a readable JSON file ({e})") from None
    source = doc.get("source", str(path)) if isinstance(doc, dict) else ""
    if isinstance(doc, dict) and "runs" in doc:  # a bench result
        runs = [r for r in doc["runs"] if r.get("mode") == "dflash" and sum(r.get("accept_hist") or [])]
        if not runs:
            raise UserError(f"{path}: no DFlash run with passes by drafts accepted")
        run = max(runs, key=lambda r: r["block_size"])
        doc, source = run, f"{path}, run {run['key']}"
    hist = doc.get("accept_hist") if isinstance(doc, dict) else None
    if not hist or any(not isinstance(x, (int, float)) or x < 0 for x in hist) or not sum(hist):
        raise UserError(f"{path}: accept_hist must be a list of non-negative weights of passes by drafts accepted")
    return Profile(str(path), tuple(float(x) for x in hist), source)


class EmulatedDrafter:
    """The drafter with its drafts replaced as the module says; the engine uses it as a Drafter (chains only)."""

    def __init__(self, drafter: Drafter, profile: Profile, target: Target, seed: int = 0):
        self.real, self.profile, self.target = drafter, profile, target  # target: DFlash's
        self.info, self.path, self.device, self.n_threads = drafter.info, drafter.path, drafter.device, drafter.n_threads
        # its acceptance is the profile's: cached apart from the real drafter's (calibrate.load_acceptance)
        self.acceptance_key = f"emulated acceptance {profile.name}"
        self._cdf = np.cumsum(profile.hist) / sum(profile.hist)
        self._u = float(np.random.default_rng(seed).random())  # where the sequence of draws starts
        self.cuts: list[int] = []  # the acceptance length drawn for each pass
        self._prompt: list[int] = []
        self._known: list[int] = []  # the target alone's text after the prompt: the first guess while DFlash's agrees
        self._emitted: list[int] | None = None  # DFlash's text so far, while a generation is emulated
        self._block_size = self._max_tokens = 0
        self._plan: tuple[int, int, list[int]] | None = None  # the next pass's anchor, drawn length and drafts
        self.seconds = 0.0  # spent in trial passes, outside the steps: to take off DFlash's decode time

    def start(self, prompt: list[int], continuation: list[int], block_size: int, max_tokens: int) -> None:
        """Before a generation: the prompt, the target alone's greedy text after it, the engine's settings."""
        self._prompt, self._known = list(prompt), list(continuation)
        self._emitted, self._block_size, self._max_tokens = [], block_size, max_tokens

    def on_tokens(self, tokens: list[int]) -> None:
        """The engine's callback for what it emits: once the next pass's anchor is out, that pass's drafts are settled
        here, outside the steps' timing (as far as a step drafts: the block, within the token budget)."""
        if self._emitted is not None:
            self._emitted += tokens
            n = len(self._emitted)
            depth = max(min(self._block_size - 1, self._max_tokens - n - 1), 0)
            pos = len(self._prompt) + n - 1
            tg = self.target
            if depth and pos + depth < tg.n_ctx and tg.n_cached() == pos:  # the last token is the next pass's anchor
                t = time.perf_counter()
                guess = self._known[n:n + depth] if self._known[:n] == self._emitted else []
                self._plan = self._accepted_drafts(self._emitted[-1], pos, guess, depth)
                self.seconds += time.perf_counter() - t

    def _draw(self) -> int:
        self._u = (self._u + GOLDEN) % 1.0
        return int(np.searchsorted(self._cdf, self._u, side="right").clip(max=len(self._cdf) - 1))

    def _accepted_drafts(self, anchor: int, pos: int, guess: list[int], depth: int) -> tuple[int, int, list[int]]:
        """The next pass's drafts, with n drawn from the profile: the first n are the tokens DFlash's target picks
        itself when it verifies them in one pass at pos, draft n+1 (if any) one it does not pick. From the guess on,
        each trial pass replaces the drafts from the first one the target would reject on by its picks there (the rows
        before it do not change with them), so n + 1 trials at most."""
        tg = self.target
        cut = self._draw()
        drafts = (guess + [0] * depth)[:depth]  # past the guess: anything, to be replaced
        n = min(cut, depth)
        if tg.recurrent:
            tg.save_state()
        for _ in range(n + 1):
            picks = tg.trial_picks([anchor, *drafts], pos)
            wrong = next((i for i in range(n) if drafts[i] != picks[i]), None)
            if wrong is None:
                break
            drafts[wrong:] = picks[wrong:depth]
        if n < depth:
            drafts[n] = (picks[n] + 1) % self.info.n_vocab
        return anchor, cut, drafts

    def stop(self) -> None:
        self._emitted, self._plan = None, None

    # ---- the Drafter interface -------------------------------------------------------------------------------
    def draft(self, anchor: int, block_size: int | None = None, n: int | None = None) -> np.ndarray:
        drafts = self.real.draft(anchor, block_size, n)  # for its cost (and during calibration, as it is)
        plan, self._plan = self._plan, None
        if plan is None or plan[0] != anchor:
            return drafts
        _, cut, planned = plan
        self.cuts.append(cut)
        return np.array(planned[:len(drafts)], dtype=drafts.dtype)

    def draft_top(self, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        raise UsageError("emulated acceptance drafts chains only (--tree-size 0)")

    def inject(self, features: np.ndarray, pos0: int) -> None:
        self.real.inject(features, pos0)

    def inject_layers(self, layers: list[int], n: int, pos0: int) -> None:
        self.real.inject_layers(layers, n, pos0)

    def crop(self, n_pos: int) -> None:
        self.real.crop(n_pos)

    @property
    def n_pos(self) -> int:
        return self.real.n_pos

    def close(self) -> None:
        self.real.close()
