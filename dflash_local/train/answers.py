"""The target answers the training prompts itself (greedy); then its hidden states over prompt + answer are captured
for the Dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.progress import Progress

from dflash_local.bench.prompts import Prompt
from dflash_local.errors import UserError
from dflash_local.target import Target
from dflash_local.train.data import Dataset, prompt_key
from dflash_local.train.prompts import prompt_group

MAX_PROMPT_TOKENS = 2048  # the context is sized for this plus the answer (within the target's own context)


def prompt_tokens(target: Target, prompt: Prompt) -> list[int]:
    """Prompt tokens, under the GGUF's chat template for a chat prompt (raw text when the model has none)."""
    text = target.chat_prompt([("user", prompt.text)]) if prompt.chat else None
    return target.tokenize(text or prompt.text)


def context_size(n_ctx_train: int, max_new_tokens: int) -> int:
    """Room for a prompt of MAX_PROMPT_TOKENS and its answer, within the target's trained context."""
    n_ctx = min(n_ctx_train, MAX_PROMPT_TOKENS + max_new_tokens + 1)
    if n_ctx - max_new_tokens < 16:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for prompts in the target's "
                        f"context of {n_ctx_train} tokens")
    return n_ctx


def fits(target: Target, prompt: list[int], max_new_tokens: int) -> bool:
    return len(prompt) + max_new_tokens < target.n_ctx


def plan(target: Target, prompts: list[Prompt], ds: Dataset,
         max_new_tokens: int) -> tuple[list[tuple[str, str, list[int]]], int]:
    """Prompts still to answer, as (key, group, tokens), and how many are too long for the context."""
    done, todo, skipped = ds.keys(), [], 0
    for p in prompts:
        key = prompt_key(p.text, p.chat)
        if key in done:  # answered in an earlier run, or a repeated prompt that would only repeat its answer
            continue
        done.add(key)
        tokens = prompt_tokens(target, p)
        if fits(target, tokens, max_new_tokens):
            todo.append((key, prompt_group(p), tokens))
        else:
            skipped += 1
    return todo, skipped


@dataclass
class Report:
    sequences: int = 0
    tokens: int = 0  # answer tokens generated, or positions captured
    seconds: float = 0.0


@dataclass
class _Slot:
    """A prompt being answered in one of the batch's sequences."""
    key: str
    group: str
    prompt: list[int]
    answer: list[int]


def answer(target: Target, todo: list[tuple[str, str, list[int]]], ds: Dataset, max_new_tokens: int,
           progress: Progress) -> Report:
    """The target answers the prompts greedily, target.n_seq of them at a time in one batch per token (a GPU
    is nearly as fast for many sequences as for one); each finished answer is stored at once."""
    report = Report()
    task = progress.add_task("target answers", total=len(todo))
    pending = iter(todo)
    slots: dict[int, _Slot] = {}  # by sequence id

    def start(seq: int) -> None:
        if (item := next(pending, None)) is not None:
            key, group, prompt = item
            first = int(target.decode(prompt, 0, all_logits=False, seq=seq)[0].argmax())
            slots[seq] = _Slot(key, group, prompt, [first])

    def store(seq: int) -> None:
        slot = slots.pop(seq)
        ans = slot.answer[:-1] if target.is_eog(slot.answer[-1]) else slot.answer
        target.clear(seq)
        ds.append(slot.key, slot.group, slot.prompt + ans, len(slot.prompt))
        report.sequences += 1
        report.tokens += len(ans)
        progress.update(task, advance=1, description=f"target answers ({report.tokens} tokens)")

    t0 = time.perf_counter()
    target.clear()
    target.capture.enable(False)
    try:
        for seq in range(target.n_seq):
            start(seq)
        while slots:
            for seq in [s for s, sl in slots.items()
                        if target.is_eog(sl.answer[-1]) or len(sl.answer) >= max_new_tokens]:
                store(seq)
                start(seq)
            if active := sorted(slots):  # ascending ids: one ubatch (Target.step)
                logits = target.step([slots[s].answer[-1] for s in active],
                                     [len(slots[s].prompt) + len(slots[s].answer) - 1 for s in active], active)
                for s, next_token in zip(active, logits.argmax(axis=1)):
                    slots[s].answer.append(int(next_token))
    finally:
        target.capture.enable(True)
        ds.save()
    report.seconds = time.perf_counter() - t0
    return report


def capture(target: Target, ds: Dataset, progress: Progress) -> Report:
    """The features of every sequence that has none yet: one prefill over prompt + answer each, far cheaper than
    capturing while answering token by token."""
    report = Report()
    t0 = time.perf_counter()
    task = progress.add_task("capture features", total=len(ds.sequences) - ds.captured)
    for tokens in ds.uncaptured():
        target.clear(0)
        target.decode(tokens, 0, all_logits=False, seq=0)
        ds.append_features(target.features())
        report.sequences += 1
        report.tokens += len(tokens)
        progress.update(task, advance=1)
    target.clear(0)
    ds.save()
    report.seconds = time.perf_counter() - t0
    return report
