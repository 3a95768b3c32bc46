"""How many drafted tokens to verify per step, chosen for the most tokens per second.

On a GPU a target pass over 16 tokens costs about as much as over 1, so the whole block is worth
verifying. On a CPU it costs several times more, and a drafter that is often wrong makes long blocks a
loss. For k drafts the expected gain is 1 + sum_i P(the first i drafts are accepted), and the cost is a
drafter pass plus a target pass over k+1 tokens; k = 0 is the target alone. Both are measured as the
run goes (each choice is tried once first, and again now and then): acceptance per block offset, and
the target's cost per pass size.
"""

from __future__ import annotations

import numpy as np

EXPLORE_EVERY = 32  # steps between tries of a choice that is not the current best


class DraftLength:
    def __init__(self, max_k: int):
        self.choices = sorted({0, *(k for k in (1, 3, 7, 15, max_k) if k <= max_k)})
        self.reached = np.zeros(max_k + 1)   # steps that verified offset i
        self.passed = np.zeros(max_k + 1)    # ... and accepted it
        self.cost: dict[int, float] = {}     # target seconds per pass of n tokens (moving average)
        self.t_draft = 0.0
        self.steps = 0

    def choose(self, limit: int) -> int:
        """Drafts to verify next step, at most `limit`."""
        options = [k for k in self.choices if k <= limit] or [0]
        self.steps += 1
        untried = [k for k in options if k + 1 not in self.cost]
        if untried:
            return untried[-1]
        if self.steps % EXPLORE_EVERY == 0:
            return options[(self.steps // EXPLORE_EVERY) % len(options)]
        return max(options, key=self._rate)

    def record(self, k: int, accepted: int, t_draft: float, t_target: float) -> None:
        self.reached[1:min(accepted + 1, k) + 1] += 1
        self.passed[1:accepted + 1] += 1
        n = k + 1
        self.cost[n] = t_target if n not in self.cost else 0.8 * self.cost[n] + 0.2 * t_target
        if k > 0:
            self.t_draft = t_draft if self.t_draft == 0 else 0.8 * self.t_draft + 0.2 * t_draft

    def _rate(self, k: int) -> float:
        # acceptance at each offset, with a prior of one accept and one reject
        p = np.cumprod((self.passed[1:k + 1] + 1) / (self.reached[1:k + 1] + 2))
        return (1.0 + p.sum()) / (self.cost[k + 1] + (self.t_draft if k else 0.0))
