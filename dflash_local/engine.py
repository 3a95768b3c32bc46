"""The DFlash decoding loop (docs/design.md, section 5): prefill, then draft -> verify -> accept ->
roll back -> inject, until the token budget, an end-of-generation token or the context ends.

Without a drafter the same loop runs the target alone, one token per pass, so the two paths share
their prefill, sampling and stopping rules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dflash_local import calibrate
from dflash_local.draft_length import Choice, DraftLength, choices_for
from dflash_local.errors import UsageError, UserError
from dflash_local.lookup import Lookup
from dflash_local.native import Drafter
from dflash_local.sampling import Sampler, SamplingParams, accept_picks
from dflash_local.target import Target
from dflash_local.tree import N_TOP, TREE_SIZE, build_tree, walk

MAX_PENDING = 256  # features held back from the drafter while the target runs alone, before they are injected anyway


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated: int = 0
    accepted: list[int] = field(default_factory=list)  # drafts accepted per verification pass
    drafted: list[int] = field(default_factory=list)  # drafts verified per pass (0: the adaptive length chose none)
    t_prefill: float = 0.0
    t_decode: float = 0.0  # everything after the prefill
    t_target: float = 0.0
    t_draft: float = 0.0
    t_inject: float = 0.0
    t_capture: float = 0.0

    @property
    def passes(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        """Mean tokens gained per target pass (accepted drafts + the target's own token)."""
        return float(np.mean(self.accepted)) + 1.0 if self.accepted else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated / self.t_decode if self.t_decode > 0 else 0.0


@dataclass
class Generation:
    tokens: list[int]
    stats: Stats
    stop: str  # "eog", "length", "context", "interrupted" or "cancelled" (on_tokens returned False)


def generate_in_job(engine: Engine, prompt: list[int], max_tokens: int,
                    on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Greedy generate for a job of many prompts (a bench, an evaluation): Ctrl-C, which generate takes as the end
    of one answer, ends the whole job."""
    gen = engine.generate(prompt, max_tokens, on_tokens=on_tokens)
    if gen.stop == "interrupted":
        raise KeyboardInterrupt
    return gen


class Engine:
    """Generates with `target`, drafting blocks with `drafter` when one is given."""

    def __init__(self, target: Target, drafter: Drafter | None = None, block_size: int | None = None,
                 adaptive: bool = True, tree_size: int = TREE_SIZE, copies: bool = True):
        """adaptive: verify as many drafts per step as measured speed favours (see draft_length); otherwise always
        all of them. tree_size: the most drafts of a tree, where the target can verify one (Target's branches);
        0, or a target that cannot: one chain of at most block_size - 1. copies: drafts copied from the context
        beside the drafter's (lookup.py)."""
        self.target = target
        self.drafter = drafter
        self.adaptive = adaptive
        self.block_size = 0
        if drafter is not None:
            self.block_size = block_size or drafter.info.block_size
            if not 2 <= self.block_size <= drafter.info.block_size:
                raise UsageError(f"--block-size must be in 2..{drafter.info.block_size} (the drafter's trained size)")
            if target.capture is None:
                raise ValueError("a target used with a drafter needs capture layers")
        # a tree where the target can hold one (attention models, opened with branches)
        self.tree_size = min(tree_size, target.branches) if drafter is not None and target.branches else 0
        # what it learns (pass costs, acceptance) carries over from one generation to the next, and to the next run
        self.policy = None
        if drafter is not None and adaptive:
            costs = calibrate.step_costs(target, drafter, self.block_size,
                                         choices_for(self.block_size - 1, self.tree_size))
            prior = calibrate.load_acceptance(target, drafter, self.block_size)
            self.policy = DraftLength(costs, self.block_size - 1, prior)
        # positions the target ran alone since the last drafter pass: their feature rows wait in the capture, to go
        # into the drafter in one pass when drafting resumes
        self._pending = 0
        self._pending_pos = 0
        self._capturing = False  # this generation may draft: the target's features go to the drafter
        self.copies = copies
        self._lookup = Lookup()  # the generation's tokens, for the copies drafted beside the drafter's

    def generate(self, prompt: list[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
                 on_tokens: Callable[[list[int]], bool | None] | None = None) -> Generation:
        """on_tokens gets the tokens as they are accepted; returning False stops the generation there (a server's
        client gone, a stop string seen)."""
        tg, dr = self.target, self.drafter
        if not prompt:
            raise UserError("the prompt is empty")
        if len(prompt) >= tg.n_ctx:
            raise UserError(f"the prompt has {len(prompt)} tokens but the context holds {tg.n_ctx}: "
                            "raise --ctx-size or shorten the prompt")
        sampler = Sampler(sampling)
        stats = Stats(prompt_tokens=len(prompt))
        tg.clear()
        if dr:
            dr.crop(0)
        self._pending = 0
        # where nothing could pay (a CPU, a drafter whose acceptance is known to be too low), the target runs alone
        # uncaptured: its passes unsplit, no drafter pass
        self._capturing = dr is not None and (
            self.policy is None or self.policy.could_draft(self.block_size - 1, self.tree_size))
        self._lookup = Lookup()
        self._remember(prompt)

        tg.pick_on_device(sampling)  # the target's tokens picked where the model runs: no logits to the host
        try:
            with tg.capture.paused() if dr and not self._capturing else contextlib.nullcontext():
                return self._generate(prompt, max_tokens, sampler, stats, on_tokens)
        finally:
            tg.pick_on_device(None)

    def _generate(self, prompt: list[int], max_tokens: int, sampler: Sampler, stats: Stats,
                  on_tokens: Callable[[list[int]], bool | None] | None) -> Generation:
        """generate's prefill and loop, once both caches are clear."""
        tg, dr = self.target, self.drafter
        capture0 = tg.capture.seconds if tg.capture else 0.0
        t0 = time.perf_counter()
        try:
            logits = tg.decode(prompt, 0, all_logits=False)
            anchor = self._picks(sampler, logits, 1)[0]
            tg.commit([anchor])
            if self._capturing:
                tg.inject_rows(dr, len(prompt), 0)
        except KeyboardInterrupt:  # Ctrl-C in the prefill: nothing generated yet
            return Generation([], stats, "interrupted")
        finally:
            stats.t_prefill = time.perf_counter() - t0

        policy = self.policy
        out: list[int] = []
        pos = len(prompt)  # position of the anchor: sampled, not yet seen by the target
        stop = "length"
        t_start = time.perf_counter()
        try:
            while True:
                # emit the anchor; it is the target's own choice
                if tg.is_eog(anchor):
                    stop = "eog"
                    break
                out.append(anchor)
                self._remember([anchor])
                if on_tokens and on_tokens([anchor]) is False:
                    stop = "cancelled"
                    break
                if len(out) >= max_tokens:
                    break
                if pos + 1 > tg.n_ctx:
                    stop = "context"
                    break
                # drafts deeper than the budget, or more than the context holds, would be wasted
                depth = max(min(self.block_size - 1, max_tokens - len(out) - 1), 0)
                room = tg.n_ctx - pos - 1
                if dr and pos + self.block_size > dr.info.n_ctx:  # the drafter's cache is full: the target goes on alone
                    room = 0
                max_chain = min(depth, room)
                max_tree = min(self.tree_size, room) if depth else 0
                tried = False
                if not self._capturing:
                    choice = Choice(False, 0)
                elif policy:
                    choice, tried = policy.choose(max_chain, max_tree)
                else:  # always all the drafts, a tree where there is one
                    choice = Choice(True, max_tree) if max_tree else Choice(False, max_chain)
                t_step = time.perf_counter()
                if choice.k:
                    self._inject_pending(stats)
                if choice.tree:
                    accepted, anchor_next, ranks = self._tree_step(anchor, pos, choice.k, depth, sampler, stats)
                else:
                    accepted, anchor_next = self._step(anchor, pos, choice.k, sampler, stats)
                    ranks = list(range(1, len(accepted) + 1))
                if policy:
                    policy.record(choice, ranks, time.perf_counter() - t_step, tried)
                n_acc = len(accepted)
                for i, tok in enumerate(accepted):
                    if tg.is_eog(tok):
                        accepted = accepted[:i]
                        anchor_next = tok
                        break
                out.extend(accepted)
                self._remember(accepted)
                if on_tokens and accepted and on_tokens(accepted) is False:
                    stop = "cancelled"
                    break
                pos += n_acc + 1
                anchor = anchor_next
        except KeyboardInterrupt:  # Ctrl-C: keep what was produced
            stop = "interrupted"

        stats.t_decode = time.perf_counter() - t_start
        if policy:
            calibrate.save_acceptance(tg, dr, self.block_size, policy.acceptance())
        stats.generated = len(out)
        stats.t_capture = (tg.capture.seconds if tg.capture else 0.0) - capture0
        return Generation(out, stats, stop)

    def _step(self, anchor: int, pos: int, k: int, sampler: Sampler, stats: Stats) -> tuple[list[int], int]:
        """Draft k tokens after the anchor at `pos`, verify them in one target pass, keep the accepted
        ones in both caches. Returns the accepted drafts and the target's next token."""
        tg, dr = self.target, self.drafter
        drafts: list[int] = []
        if k > 0:  # a copy from the context that matched a whole suffix, else the drafter's chain
            t = time.perf_counter()
            drafts = self._lookup.sure_copy(k) or dr.draft(anchor, self.block_size, k).tolist()
            stats.t_draft += time.perf_counter() - t

        t = time.perf_counter()
        if k > 0 and tg.recurrent and not tg.snapshots:
            tg.save_state()
        batch = [anchor, *drafts]
        logits = tg.decode(batch, pos, all_logits=True, keep_rows=self._pending > 0)
        if (picks := tg.picks(len(batch))) is not None:
            n_acc, token = accept_picks(picks, drafts)
            tg.commit(picks[: n_acc + 1].tolist())
        else:
            n_acc, token = sampler.verify(logits, drafts)
        stats.t_target += time.perf_counter() - t
        if dr:
            if self._capturing:
                if k:  # into the drafter straight from the target's rows (none held back: injected before the draft)
                    self._inject(n_acc + 1, pos, stats)
                else:  # the target ran alone: its row waits in the capture for the next draft
                    if not self._pending:
                        self._pending_pos = pos
                    self._pending += 1
                    if self._pending >= MAX_PENDING:
                        self._inject_pending(stats)
            stats.accepted.append(n_acc)
            stats.drafted.append(len(drafts))
        if n_acc < len(drafts):
            t = time.perf_counter()
            tg.rollback(pos + n_acc + 1, pos, batch[: n_acc + 1])
            stats.t_target += time.perf_counter() - t
        return drafts[:n_acc], token

    def _remember(self, tokens: list[int]) -> None:
        """The generation's tokens, where drafts may copy from them (a generation that may draft)."""
        if self.copies and self._capturing:
            self._lookup.extend(tokens)

    def _picks(self, sampler: Sampler, logits: np.ndarray, n: int) -> list[int]:
        """The target's tokens for the last decode's n rows: picked in the graph, else from the logits."""
        picks = self.target.picks(n)
        if picks is not None:
            return picks.tolist()
        return [sampler.sample(row) for row in logits[:n]]

    def _inject_pending(self, stats: Stats) -> None:
        """The features of positions the target ran alone, held in the capture, into the drafter in one pass."""
        if self._pending:
            n, self._pending = self._pending, 0
            self._inject(n, self._pending_pos, stats)

    def _inject(self, n: int, pos: int, stats: Stats) -> None:
        """The first n feature rows held into the drafter at pos (Target.inject_rows)."""
        t = time.perf_counter()
        if pos + n <= self.drafter.info.n_ctx:  # else it is full and drafts no more
            self.target.inject_rows(self.drafter, n, pos)
        stats.t_inject += time.perf_counter() - t

    def _tree_step(self, anchor: int, pos: int, k: int, depth: int, sampler: Sampler,
                   stats: Stats) -> tuple[list[int], int, list[int]]:
        """As _step with a tree of k drafts at most `depth` deep: from the anchor, the target's own token at each node
        (greedy or sampled from its distribution, so lossless as _step) leads to the child drafting it, until none
        does. Also returns the accepted nodes' ranks in the tree (DraftTree.ranks)."""
        tg, dr = self.target, self.drafter
        t = time.perf_counter()
        ids, probs = dr.draft_top(anchor, N_TOP, self.block_size, depth)
        tree = build_tree(ids, probs, k, self._lookup.copy(depth))
        stats.t_draft += time.perf_counter() - t

        t = time.perf_counter()
        logits = tg.decode_tree([anchor, *tree.tokens], tree.depths, tree.seqs, pos)
        picks = tg.picks(len(tree.tokens) + 1)  # greedy, or a tree that is one chain (its rows sequence 0's alone)

        def pick(i: int) -> int:  # the target's token after node i
            return int(picks[i]) if picks is not None else sampler.sample(logits[i])

        path, token = walk(tree, pick)
        if picks is not None:
            tg.commit([int(picks[i]) for i in path])
        stats.t_target += time.perf_counter() - t
        t = time.perf_counter()
        tg.inject_path(dr, path, pos)
        stats.t_inject += time.perf_counter() - t
        t = time.perf_counter()
        n_acc = len(path) - 1
        # the path's nodes on the batch's first chain (batch index = depth) keep their cells; the rest are replayed
        on_first_chain = next((d for d, i in enumerate(path) if i != d), len(path))
        tg.keep_branch(pos + on_first_chain, [tree.tokens[i - 1] for i in path[on_first_chain:]], len(tree.seqs[0]))
        stats.t_target += time.perf_counter() - t
        stats.accepted.append(n_acc)
        stats.drafted.append(k)
        return [tree.tokens[i - 1] for i in path[1:]], token, [tree.ranks[i] for i in path[1:]]
