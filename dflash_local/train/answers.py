"""The target answers the training prompts itself (greedy), and its hidden states are captured for the Dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.progress import Progress

from dflash_local.engine import Engine
from dflash_local.errors import UserError
from dflash_local.target import Target
from dflash_local.train.data import Dataset, prompt_key

MAX_PROMPT_TOKENS = 2048  # the context is sized for this plus the answer (within the target's own context)


def templated(target: Target, prompt: str) -> list[int]:
    """Prompt tokens under the GGUF's chat template (raw text when the model has none)."""
    return target.tokenize(target.chat_prompt([("user", prompt)]) or prompt)


def context_size(n_ctx_train: int, max_new_tokens: int) -> int:
    """Room for a prompt of MAX_PROMPT_TOKENS and its answer, within the target's trained context."""
    n_ctx = min(n_ctx_train, MAX_PROMPT_TOKENS + max_new_tokens + 1)
    if n_ctx - max_new_tokens < 16:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for prompts in the target's "
                        f"context of {n_ctx_train} tokens")
    return n_ctx


def fits(target: Target, prompt: list[int], max_new_tokens: int) -> bool:
    return len(prompt) + max_new_tokens < target.n_ctx


def plan(target: Target, prompts: list[str], ds: Dataset,
         max_new_tokens: int) -> tuple[list[tuple[str, list[int]]], int]:
    """Prompts still to answer, as (key, tokens), and how many are too long for the context."""
    done, todo, skipped = ds.keys(), [], 0
    for p in dict.fromkeys(prompts):  # a repeated prompt would only repeat its answer
        key = prompt_key(p)
        if key in done:
            continue
        tokens = templated(target, p)
        if fits(target, tokens, max_new_tokens):
            todo.append((key, tokens))
        else:
            skipped += 1
    return todo, skipped


@dataclass
class GenerationReport:
    sequences: int = 0
    tokens: int = 0  # answer tokens generated
    seconds: float = 0.0


def answer(target: Target, todo: list[tuple[str, list[int]]], ds: Dataset, max_new_tokens: int,
           progress: Progress) -> GenerationReport:
    """The target answers each prompt greedily; one prefill over prompt + answer then captures the features of
    every position (batched, so far cheaper than capturing during token-by-token decoding)."""
    report = GenerationReport()
    engine = Engine(target)
    task = progress.add_task("target answers", total=len(todo))
    t0 = time.perf_counter()
    for key, prompt in todo:
        target.capture.enable(False)
        try:
            gen = engine.generate(prompt, max_new_tokens)
        finally:
            target.capture.enable(True)
        tokens = prompt + gen.tokens
        target.clear()
        target.decode(tokens, 0, all_logits=False)
        ds.append(key, tokens, len(prompt), target.features())
        report.sequences += 1
        report.tokens += len(gen.tokens)
        progress.update(task, advance=1, description=f"target answers ({report.tokens} tokens)")
    report.seconds = time.perf_counter() - t0
    return report
