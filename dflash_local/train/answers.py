"""The target answers the training prompts itself (greedy), and chat requests it writes itself; then its hidden states
over prompt + answer are captured for the Dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress

from dflash_local.bench.prompts import Prompt
from dflash_local.errors import UserError
from dflash_local.target import Target
from dflash_local.train.data import Dataset, prompt_key
from dflash_local.train.prompts import prompt_group

MAX_PROMPT_TOKENS = 2048  # the context is sized for this plus the answer (within the target's own context)
# Requests the target writes itself, as Magpie does (arXiv 2406.08464): given its chat template up to the user's
# text, the target writes the user's request, sampled at temperature 1 among the tokens within 1/10 of the likeliest
# (min-p): varied, and still mostly coherent from a 135M model. Then it answers it greedily, as any prompt.
REQUEST_MIN_P = 0.1
MAX_REQUEST_TOKENS = 128
SELF_GROUP = "self/"  # group prefix of those requests' sequences (each its own group)


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


@dataclass(frozen=True)
class Todo:
    """A prompt to answer, or (key "") a request for the target to write first: prompt is then its chat template
    up to the user's text."""
    key: str
    group: str
    prompt: list[int]


def request_template(target: Target) -> tuple[list[int], list[int]]:
    """The tokens of the target's chat template before and after the user's text."""
    mark = "USER_TEXT_7f3a"
    text = target.chat_prompt([("user", mark)])
    if text is None:
        raise UserError("--self-prompts: the target has no chat template to write requests under")
    head, tail = text.split(mark)
    return target.tokenize(head), target.tokenize(tail, add_special=False)


def plan(target: Target, prompts: list[Prompt], ds: Dataset, max_new_tokens: int,
         requests: int = 0) -> tuple[list[Todo], int]:
    """Prompts still to answer, with the requests the target is still to write (of `requests` in all) spread
    evenly among them, so a run cut short has some of each; and how many prompts are too long for the context."""
    done, todo, skipped = ds.keys(), [], 0
    for p in prompts:
        key = prompt_key(p.text, p.chat)
        if key in done:  # answered in an earlier run, or a repeated prompt that would only repeat its answer
            continue
        done.add(key)
        tokens = prompt_tokens(target, p)
        if fits(target, tokens, max_new_tokens):
            todo.append(Todo(key, prompt_group(p), tokens))
        else:
            skipped += 1
    requests -= sum(s.group.startswith(SELF_GROUP) for s in ds.sequences)
    if requests <= 0:
        return todo, skipped
    head = Todo("", SELF_GROUP, request_template(target)[0])
    spread = [((i + 0.5) / len(todo), t) for i, t in enumerate(todo)]
    spread += [((i + 0.5) / requests, head) for i in range(requests)]
    return [t for _, t in sorted(spread, key=lambda x: x[0])], skipped


def max_rows(todo: list[Todo], max_new_tokens: int) -> int:
    """Most tokens the sequences of todo can hold (a request: its template's head, the request, and up to 16 tokens
    of the template's tail)."""
    return sum(len(t.prompt) + max_new_tokens + (0 if t.key else MAX_REQUEST_TOKENS + 16) for t in todo)


@dataclass
class Report:
    sequences: int = 0
    tokens: int = 0  # answer tokens generated, or positions captured
    seconds: float = 0.0


@dataclass
class _Slot:
    """A prompt being answered in one of the batch's sequences. While the target still writes the request, its
    tokens so far end prompt and answer is empty. The last token is not in the KV cache yet: the next step decodes
    it."""
    key: str
    group: str
    prompt: list[int]
    answer: list[int]
    request_from: int = 0  # where the request the target writes begins in prompt (0: none, or written)

    @property
    def last(self) -> int:
        return self.answer[-1] if self.answer else self.prompt[-1]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.answer)


def sample_requests(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One request token per row of logits: temperature 1, min-p REQUEST_MIN_P. Gumbel-max over the kept tokens
    alone (a few per row): noise over the whole vocabulary took 67 ms against 8.5 (64 rows of 49,152, dev CPU)."""
    rows, cols = np.nonzero(logits >= logits.max(axis=1, keepdims=True) + np.log(REQUEST_MIN_P))
    score = logits[rows, cols] + rng.gumbel(size=rows.size)
    order = np.lexsort((score, rows))  # by row, then score: the last of each row wins
    rows, cols = rows[order], cols[order]
    return cols[np.append(rows[1:] != rows[:-1], True)]


def answer(target: Target, todo: list[Todo], ds: Dataset, max_new_tokens: int, progress: Progress,
           seed: int = 0) -> Report:
    """The target writes the requests of todo and answers todo's prompts greedily, target.n_seq of them at a time
    in one batch per token (a GPU is nearly as fast for many sequences as for one); each finished answer is stored
    at once."""
    report = Report()
    task = progress.add_task("target answers", total=len(todo))
    pending = iter(todo)
    slots: dict[int, _Slot] = {}  # by sequence id
    seen = ds.keys()
    rng = np.random.default_rng([seed, len(ds.sequences)])  # a run that resumes writes other requests
    tail = request_template(target)[1] if any(not t.key for t in todo) else []

    def start(seq: int) -> None:
        if (item := next(pending, None)) is None:
            return
        logits = target.decode(item.prompt, 0, all_logits=False, seq=seq)
        if item.key:
            slots[seq] = _Slot(item.key, item.group, item.prompt, [int(logits[0].argmax())])
        else:
            slots[seq] = _Slot("", item.group, item.prompt + [int(sample_requests(logits, rng)[0])], [],
                               request_from=len(item.prompt))

    def finished(slot: _Slot) -> bool:
        if slot.request_from:
            return target.is_eog(slot.last) or len(slot.prompt) - slot.request_from >= MAX_REQUEST_TOKENS
        return target.is_eog(slot.last) or len(slot.answer) >= max_new_tokens

    def asked(seq: int) -> None:
        """The request is written: the template's tail follows it and the answer starts, unless the request is
        empty or a repeat."""
        slot, n_cached = slots[seq], len(slots[seq].prompt) - 1
        request = slot.prompt[slot.request_from:]
        if target.is_eog(request[-1]):
            request.pop()
        text = b"".join(target.piece(t) for t in request).decode(errors="replace")
        slot.key = prompt_key(text, True)
        if not text.strip() or slot.key in seen:
            del slots[seq]
            target.clear(seq)
            progress.update(task, advance=1)
            start(seq)
            return
        seen.add(slot.key)
        slot.group += slot.key
        slot.prompt = slot.prompt[:slot.request_from] + request + tail
        slot.answer = [int(target.decode(slot.prompt[n_cached:], n_cached, all_logits=False, seq=seq)[0].argmax())]
        slot.request_from = 0

    def store(seq: int) -> None:
        slot = slots.pop(seq)
        ans = slot.answer[:-1] if target.is_eog(slot.answer[-1]) else slot.answer
        target.clear(seq)
        ds.append(slot.key, slot.group, slot.prompt + ans, len(slot.prompt))
        report.sequences += 1
        report.tokens += len(ans)
        progress.update(task, advance=1, description=f"target answers ({report.tokens} tokens)")
        start(seq)

    t0 = time.perf_counter()
    target.clear()
    target.capture.enable(False)
    try:
        for seq in range(target.n_seq):
            start(seq)
        while slots:
            while ready := [s for s, slot in slots.items() if finished(slot)]:  # a new slot may be done at once
                for seq in ready:
                    (asked if slots[seq].request_from else store)(seq)
            if active := sorted(slots):  # ascending ids: one ubatch (Target.step)
                logits = target.step([slots[s].last for s in active], [slots[s].n_tokens - 1 for s in active], active)
                chosen = logits.argmax(axis=1)
                if asking := [i for i, s in enumerate(active) if slots[s].request_from]:
                    chosen[asking] = sample_requests(logits[asking], rng)
                for s, token in zip(active, chosen):
                    (slots[s].prompt if slots[s].request_from else slots[s].answer).append(int(token))
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
    for tokens in ds.token_lists(ds.captured):
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
