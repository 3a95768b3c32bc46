"""How many drafted tokens to verify per step, as a chain or as a tree, chosen for the most tokens per second.

On a GPU a target's compute over 16 or 63 tokens costs about as much as over 1, so a whole block, or a big
tree of drafts, is worth verifying where compute sets the pace. On a CPU a pass of 16 tokens costs several one-token
passes and a drafter pass more than one (SmolLM2 on this project's 2-core CPU: 10x and 2-3x), so the target alone is
often fastest there. For k drafts the expected gain is 1 + the drafts accepted, and the cost is a drafter pass plus a
target pass; k = 0 is the target alone.

The costs are known before the first step (calibrate.py measures them once per machine, model and settings), so only
acceptance is learnt as the run goes, and what was learnt seeds the next run (`prior`). A choice never measured is
tried when it could beat the best one even if every draft were accepted (a longer chain: every draft past a shorter
one's, in as many of its steps as accepted all the shorter one's drafts; a tree: no more than a bigger tree is hoped
to accept), and only while the time spent on such tries
stays within EXPLORE_SHARE of the decode time so far, times what the try could win at most (a choice that could be
10 % faster than the best gets a tenth of that share): a short run stays the target alone's speed where drafting does
not pay, and a long one finds where it does; a generation that starts with nothing to try or to prefer to the target
alone needs no features at all (`could_draft`). The drafts of a smaller choice are the first of a bigger one of its
kind (a chain's first drafts, a tree's first-chosen nodes), so every step also tells what each smaller choice of its
kind would have accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXPLORE_SHARE = 0.02  # the most of the decode time spent on choices that are not the best by what is known
PRIOR_STEPS = 32  # the most weight, in steps per choice, that acceptance learnt in earlier runs keeps


@dataclass(frozen=True, order=True)
class Choice:
    tree: bool
    k: int  # drafts verified (0: the target alone)

    @property
    def key(self) -> str:
        return f"{'tree' if self.tree else 'chain'}-{self.k}"


def choices_for(max_chain: int, max_tree: int) -> list[Choice]:
    """What a step may verify with a block of max_chain + 1 and trees of at most max_tree drafts."""
    chains = {Choice(False, k) for k in (0, 1, 3, 7, 15, max_chain) if k <= max_chain}
    trees = {Choice(True, k) for k in (15, 31, 62, max_tree) if 0 < k <= max_tree}
    return sorted(chains | trees)


class DraftLength:
    def __init__(self, costs: dict[Choice, float], depth: int,
                 prior: dict[Choice, tuple[float, float]] | None = None):
        """costs: seconds a step of each choice takes (target and drafter), from calibration; depth: the most drafts a
        step can accept (a tree's depth); prior: (steps, drafts accepted) per choice from earlier runs."""
        self.choices = sorted(costs)
        self.depth = depth
        self.calibrated = dict(costs)
        self.cost = dict(costs)  # moving averages from here on
        self.seen = dict.fromkeys(self.choices, 0.0)    # steps of its kind that verified at least its k drafts
        self.gained = dict.fromkeys(self.choices, 0.0)  # ... and the drafts they would have accepted with only k
        self.steps = dict.fromkeys(self.choices, 0)  # this run's steps counted in `seen` (chains)
        self.whole = dict.fromkeys(self.choices, 0)  # ... of which all its k drafts were accepted
        for c, (seen, gained) in (prior or {}).items():
            if c in self.seen and seen > 0:
                w = min(seen, PRIOR_STEPS) / seen
                self.seen[c], self.gained[c] = seen * w, gained * w
        self.t_total = 0.0  # seconds of all steps recorded
        self.t_explore = 0.0  # ... of those that were tries of a choice other than the best

    def choose(self, max_chain: int, max_tree: int) -> tuple[Choice, bool]:
        """What to verify next step (at most max_chain drafts as a chain, or max_tree as a tree) and whether it is a
        try rather than the best by what is known."""
        options = self._options(max_chain, max_tree)
        best = max(options, key=self._rate)
        rate = self._rate(best)

        def affordable(c: Choice) -> bool:  # the tries' time stays within a share that grows with what c could win
            gain = self._hope(c) / rate - 1.0
            return gain > 0 and self.t_explore + self.cost[c] <= EXPLORE_SHARE * min(gain, 1.0) * self.t_total

        tries = [c for c in options if c != best and affordable(c)]
        if tries:
            return max(tries, key=self._hope), True
        return best, False

    def could_draft(self, max_chain: int, max_tree: int) -> bool:
        """Whether a choice that drafts is the best by what is known, or could beat the best by its hope. If none,
        no step drafts until what is known changes, which only a drafting step or the machine's speed does: a
        generation that starts so runs the target alone, and the drafter needs none of its features."""
        options = self._options(max_chain, max_tree)
        best = max(options, key=self._rate)
        return best.k > 0 or any(c.k > 0 and self._hope(c) > self._rate(best) for c in options)

    def record(self, choice: Choice, ranks: list[int], seconds: float, tried: bool) -> None:
        """ranks: the order in which the accepted drafts were chosen (1: first), along the accepted path; seconds:
        the step's time, target and drafter."""
        for c in self.choices:
            if c.tree == choice.tree and 0 < c.k <= choice.k:
                accepted = sum(r <= c.k for r in ranks)
                self.seen[c] += 1
                self.gained[c] += accepted
                self.steps[c] += 1
                self.whole[c] += accepted == c.k
        # a step the machine stalled (another process, a page fault) moves the estimate by a fifth at most: the best
        # choice's cost is only measured again when it is chosen, and one stalled step must not hand its place away
        self.cost[choice] = 0.8 * self.cost[choice] + 0.2 * min(seconds, 2 * self.cost[choice])
        self.t_total += seconds
        if tried:
            self.t_explore += seconds

    def acceptance(self) -> dict[Choice, tuple[float, float]]:
        """(steps, drafts accepted) per choice: the prior of a later run."""
        return {c: (self.seen[c], self.gained[c]) for c in self.choices if self.seen[c]}

    def _options(self, max_chain: int, max_tree: int) -> list[Choice]:
        return [c for c in self.choices if c.k <= (max_tree if c.tree else max_chain)]

    def _optimist(self, c: Choice) -> float:
        """Drafts c might accept per step: its measured gain plus a margin up to all its drafts that shrinks as it is
        measured."""
        gain = self._gain(c)
        return gain + (min(c.k, self.depth) - gain) / math.sqrt(1.0 + self.seen[c])

    def _gain(self, c: Choice) -> float:
        """Expected drafts accepted per step: none until measured (the target alone is the safe default)."""
        return self.gained[c] / self.seen[c] if c.k and self.seen[c] else 0.0

    def _rate(self, c: Choice) -> float:
        return (1.0 + self._gain(c)) / self.cost[c]

    def _hope(self, c: Choice) -> float:
        """The rate c might have: its measured gain plus a margin up to all k drafts that shrinks as it is measured,
        at the lower of its measured and calibrated costs (so a choice whose cost rose while the machine was busy is
        tried again once it is not, the target alone too)."""
        cost = min(self.cost[c], self.calibrated[c])
        hope = self._optimist(c)
        if c.tree:  # its drafts are a bigger tree's first-ranked ones: it accepts no more than that tree does
            hope = min([hope, *(self._optimist(s) for s in self.choices if s.tree and s.k > c.k and self.seen[s])])
        else:
            # a chain accepts past a shorter one's k drafts only where that one accepted all k: at most that share
            # of its steps (with the same kind of margin) times the drafts it adds
            for s in self.choices:
                if not s.tree and 0 < s.k < c.k and self.steps[s]:
                    share = self.whole[s] / self.steps[s]
                    share += (1.0 - share) / math.sqrt(1.0 + self.steps[s])
                    hope = min(hope, self._gain(s) + (min(c.k, self.depth) - s.k) * share)
        return (1.0 + hope) / cost
