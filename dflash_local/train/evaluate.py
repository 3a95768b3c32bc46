"""Acceptance length (tau) of a drafter on held-out prompts, measured with our engine (greedy, whole blocks).

The prompt sets are `dflash bench`'s (humaneval: raw completion of the code prompt, as in the DFlash paper;
chat: its general-chat set; or a file), so the numbers compare with the benchmark's. None is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from dflash_local.bench.prompts import Prompt
from dflash_local.engine import Engine, generate_in_job
from dflash_local.loader import open_models
from dflash_local.target import TargetParams
from dflash_local.train.answers import fits, prompt_tokens


@dataclass
class EvalReport:
    prompts: int
    tau: float  # mean over prompts of Generation.stats.tau
    tokens: int
    seconds: float  # decoding, prefills excluded
    accept_hist: list[int]  # verification passes by drafts accepted (0, 1, ...), over all prompts

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def measure_tau(target: Path, drafter: Path, prompts: list[Prompt], max_new_tokens: int, params: TargetParams,
                device: str | None, progress: Progress, tree_size: int = 15) -> EvalReport:
    """tree_size: the drafts of a pass as a tree of that many where the target can verify one (15: a pass the size
    of a block of 16), 0: as one chain."""
    tg, dr = open_models(target, drafter, params, device, tree_size)
    try:
        # every pass drafts the whole block (or tree): tau measures the drafter
        engine = Engine(tg, dr, adaptive=False, tree_size=tree_size)
        taus, tokens, seconds, hist = [], 0, 0.0, np.zeros(dr.info.block_size, dtype=np.int64)
        task = progress.add_task("evaluation", total=len(prompts))
        for p in prompts:
            ids = prompt_tokens(tg, p)
            if fits(tg, ids, max_new_tokens):
                s = generate_in_job(engine, ids, max_new_tokens).stats
                if s.passes:
                    taus.append(s.tau)
                    hist += np.bincount(s.accepted, minlength=len(hist))
                tokens, seconds = tokens + s.generated, seconds + s.t_decode
            progress.update(task, advance=1, description=f"evaluation (tau {np.mean(taus) if taus else 0:.2f})")
    finally:
        dr.close()
        tg.close()
    return EvalReport(len(taus), float(np.mean(taus)) if taus else 0.0, tokens, seconds, hist.tolist())
