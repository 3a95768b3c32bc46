"""How many drafted tokens to verify per step, as a chain or as a tree, chosen for the most tokens per second.

On a GPU a target's compute over 16 or 63 tokens costs about as much as over 1, so a whole block, or a big
tree of drafts, is worth verifying where compute sets the pace (not the host's work per pass, as for a model
of 135M). On a CPU it costs several times more, and a drafter that is often
wrong makes long blocks a loss. A tree gains more per pass than a chain of as many drafts, but its pass
costs more where the host's work per pass counts (its sequences, and the path decoded again when it
leaves the first chain). For k drafts the expected gain is 1 + the drafts accepted, and the cost is a
drafter pass plus a target pass; k = 0 is the target alone. Both are measured as the run goes: each
choice is tried once first, then the best one's neighbours again now and then. The drafts of a smaller
choice are the first of a bigger one of its kind (a chain's first drafts, a tree's first-chosen nodes),
so every step also tells what each smaller choice of its kind would have accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPLORE_EVERY = 32  # steps between tries of a choice that is not the current best


@dataclass(frozen=True, order=True)
class Choice:
    tree: bool
    k: int  # drafts verified (0: the target alone)


class DraftLength:
    def __init__(self, max_chain: int, max_tree: int = 0):
        chains = {Choice(False, k) for k in (0, 1, 3, 7, 15, max_chain) if k <= max_chain}
        trees = {Choice(True, k) for k in (15, 31, 62, max_tree) if 0 < k <= max_tree}
        self.choices = sorted(chains | trees)
        self.seen = dict.fromkeys(self.choices, 0)    # steps of its kind that verified at least its k drafts
        self.gained = dict.fromkeys(self.choices, 0)  # ... and the drafts they would have accepted with only k
        self.cost: dict[Choice, float] = {}  # target seconds per pass (moving average)
        self.t_draft: dict[bool, float] = {}  # drafter seconds per pass, chain or tree (moving average)
        self.steps = 0

    def choose(self, max_chain: int, max_tree: int) -> Choice:
        """What to verify next step: at most max_chain drafts as a chain, or max_tree as a tree."""
        options = [c for c in self.choices if c.k <= (max_tree if c.tree else max_chain)]
        self.steps += 1
        untried = [c for c in options if c not in self.cost]
        if untried:
            return untried[-1]
        best = max(options, key=self._rate)
        if self.steps % EXPLORE_EVERY == 0:  # a neighbour of the best, by turns the next smaller and the next bigger:
            # a far one can cost many one-token passes (a tree of 62 on a CPU), and it has been measured before
            i = options.index(best) + (1 if self.steps // EXPLORE_EVERY % 2 else -1)
            return options[min(max(i, 0), len(options) - 1)]
        return best

    def record(self, choice: Choice, ranks: list[int], t_draft: float, t_target: float) -> None:
        """ranks: the order in which the accepted drafts were chosen (1: first), along the accepted path."""
        for c in self.choices:
            if c.tree == choice.tree and 0 < c.k <= choice.k:
                self.seen[c] += 1
                self.gained[c] += sum(r <= c.k for r in ranks)
        self.cost[choice] = _average(self.cost.get(choice), t_target)
        if choice.k:
            self.t_draft[choice.tree] = _average(self.t_draft.get(choice.tree), t_draft)

    def _rate(self, c: Choice) -> float:
        if not c.k:
            return 1.0 / self.cost[c]
        return (1.0 + self.gained[c] / self.seen[c]) / (self.cost[c] + self.t_draft[c.tree])


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.8 * old + 0.2 * new
