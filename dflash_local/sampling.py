"""Target distributions and the lossless accept test of speculative sampling.

The drafter drafts greedily, so its proposal is a point mass on each draft token d. The accept test
min(1, p(d)/q(d)) becomes "accept with probability p(d)", and a rejection samples from p with d
removed and renormalised: every token then has exactly probability p, the target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # <= 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """One row of logits -> the distribution the target samples from (top-k, top-p, min-p, temperature)."""
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cum, params.top_p)) + 1
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p = np.where(keep, p, 0.0)
    if params.min_p > 0.0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
    return p / p.sum()


class Sampler:
    """Chooses the target's tokens from verification logits, greedy or sampled."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        p = target_probs(logits, self.params)
        return int(self.rng.choice(p.size, p=p))

    def verify(self, logits: np.ndarray, drafts: np.ndarray) -> tuple[int, int]:
        """logits [k+1, V] for [anchor, d1..dk] -> (number of drafts accepted, the next token)."""
        if self.params.greedy:
            return accept_picks(np.argmax(logits, axis=1), drafts)
        for i, d in enumerate(drafts):
            p = target_probs(logits[i], self.params)
            if self.rng.random() < p[d]:
                continue
            p[d] = 0.0
            return i, int(self.rng.choice(p.size, p=p / p.sum()))
        return len(drafts), self.sample(logits[len(drafts)])


def accept_picks(picks: np.ndarray, drafts: np.ndarray) -> tuple[int, int]:
    """The target's own tokens for [anchor, d1..dk] (its argmax, or a sample of its distribution, for each row) ->
    (drafts accepted: as long as each is the target's token, the target's token after them). With samples this is
    lossless too: a deterministic draft d is kept with probability p(d), and the token at the first mismatch is a
    sample of p without d, as the accept test below does it."""
    if not len(drafts):  # the target alone: most steps where drafting does not pay
        return 0, int(picks[0])
    n = int(np.argmin(np.append(picks[:-1] == drafts, False)))
    return n, int(picks[n])
