"""The target answers the training prompts itself (greedy), and chat requests it writes itself; then its hidden states
over prompt + answer are captured for the Dataset."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from rich.progress import Progress

from dflash_local.bench.prompts import Prompt
from dflash_local.errors import UserError
from dflash_local.target import Target, TargetParams
from dflash_local.train.data import Dataset, prompt_key
from dflash_local.train.prompts import prompt_group

MAX_PROMPT_TOKENS = 2048  # the context is sized for this plus the answer (within the target's own context)
# Requests the target writes itself, as Magpie does (arXiv 2406.08464): given its chat template up to the user's
# text, the target writes the user's request, sampled at temperature 1 among the tokens within 1/10 of the likeliest
# (min-p): varied, and still mostly coherent from a 135M model. Then it answers it greedily, as any prompt.
REQUEST_MIN_P = 0.1
MAX_REQUEST_TOKENS = 128
SELF_GROUP = "self/"  # group prefix of those requests' sequences (each its own group)
CAPTURE_SEQUENCES = 32  # most sequences capture() packs into one batch


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
    """A prompt to continue, with the key and group its sequence gets in the Dataset."""
    key: str
    group: str
    prompt: list[int]


def request_head(target: Target) -> list[int]:
    """The tokens of the target's chat template before the user's text."""
    mark = "USER_TEXT_7f3a"
    text = target.chat_prompt([("user", mark)])
    if text is None:
        raise UserError("--self-prompts: the target has no chat template to write requests under")
    return target.tokenize(text.split(mark)[0])


def plan(target: Target, prompts: list[Prompt], ds: Dataset, max_new_tokens: int) -> tuple[list[Todo], int]:
    """Prompts still to answer, and how many are too long for the context."""
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
    return todo, skipped


def requests_missing(ds: Dataset, requests: int) -> int:
    """Of `requests` the target is to write in all, those whose answers are not in ds yet."""
    return max(0, requests - sum(s.group.startswith(SELF_GROUP) for s in ds.sequences))


def max_rows(target: Target, todo: list[Todo], requests: int, max_new_tokens: int) -> int:
    """Most tokens the sequences of todo and of `requests` requests to write can hold."""
    request = len(request_head(target)) + MAX_REQUEST_TOKENS + 16 if requests else 0  # 16: the template's tail
    return sum(len(t.prompt) for t in todo) + requests * request + (len(todo) + requests) * max_new_tokens


def spread(todo: list[Todo], requests: list[Todo]) -> list[Todo]:
    """The requests spread evenly among the prompts, so a run cut short has answered some of each."""
    at = [((i + 0.5) / len(todo), t) for i, t in enumerate(todo)]
    at += [((i + 0.5) / len(requests), t) for i, t in enumerate(requests)]
    return [t for _, t in sorted(at, key=lambda x: x[0])]


@dataclass
class Report:
    sequences: int = 0
    tokens: int = 0  # answer tokens generated, or positions captured
    seconds: float = 0.0


@dataclass
class _Slot:
    """A prompt being continued in one of the batch's sequences. The last token is not in the KV cache yet: the next
    step decodes it."""
    todo: Todo
    out: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.todo.prompt) + len(self.out)


def continue_prompts(target: Target, next_todo: Callable[[], Todo | None], pick: Callable[[list[int]], np.ndarray],
                     max_tokens: int, done: Callable[[Todo, list[int]], None],
                     stop: Callable[[list[int]], bool] | None = None) -> None:
    """Continue prompts target.n_seq at a time, in one batch per token (a GPU is nearly as fast for many sequences
    as for one), each until an end-of-generation token, max_tokens or stop(its tokens so far); pick(seqs) chooses the
    tokens of the last decode's outputs, one per sequence of seqs. done(todo, out) gets each finished one (its
    end-of-generation token left off). The target has no capture: features come later, from prefills (capture)."""
    slots: dict[int, _Slot] = {}  # by sequence id

    def start(seq: int) -> None:
        if (todo := next_todo()) is not None:
            target.decode(todo.prompt, 0, all_logits=False, seq=seq)
            slots[seq] = _Slot(todo, [int(pick([seq])[0])])

    def finished(slot: _Slot) -> bool:
        return target.is_eog(slot.out[-1]) or len(slot.out) >= max_tokens or (stop is not None and stop(slot.out))

    target.clear()
    for seq in range(target.n_seq):
        start(seq)
    while slots:
        while ready := [s for s, slot in slots.items() if finished(slot)]:  # a new slot may be done at once
            for seq in ready:
                slot = slots.pop(seq)
                target.clear(seq)
                done(slot.todo, slot.out[:-1] if target.is_eog(slot.out[-1]) else slot.out)
                start(seq)
        if active := sorted(slots):  # ascending ids: one ubatch (Target.step)
            target.step([slots[s].out[-1] for s in active], [slots[s].n_tokens - 1 for s in active], active)
            for s, token in zip(active, pick(active)):
                slots[s].out.append(int(token))


def write_requests(target: Target, n: int, ds: Dataset, max_new_tokens: int, progress: Progress,
                   seed: int = 0) -> list[Todo]:
    """Up to n chat requests the target writes itself under its chat template, each new (not in ds, not repeated,
    not empty), as prompts to answer; fewer if it keeps repeating itself (4 n + 64 tries). llama.cpp samples them
    where the model runs: with numpy, min-p over 256 rows of 49,152 logits took 44 ms a step (dev CPU), twice the
    H200's whole step."""
    head = Todo("", SELF_GROUP, request_head(target))
    seen, requests, issued, tries = ds.keys(), [], 0, 0
    task = progress.add_task("target writes requests", total=n)

    def next_head() -> Todo | None:
        nonlocal issued, tries
        issued, tries = issued + 1, tries + 1
        return head if issued <= n and tries <= 4 * n + 64 else None

    def done(_: Todo, request: list[int]) -> None:
        nonlocal issued
        text = target.text(request)
        key = prompt_key(text, True)
        tokens = prompt_tokens(target, Prompt(key, text, True))
        if not text.strip() or key in seen or not fits(target, tokens, max_new_tokens):
            issued -= 1  # another one instead
            return
        seen.add(key)
        requests.append(Todo(key, SELF_GROUP + key, tokens))
        progress.update(task, advance=1)

    # another seed for each run that resumes: it writes other requests
    if not target.sample_on_device(REQUEST_MIN_P, seed * 1_000_003 + len(ds.sequences) * 1009):
        raise UserError("--self-prompts: llama.cpp cannot sample on this backend (try --n-gpu-layers 0)")
    try:
        continue_prompts(target, next_head, target.sampled, MAX_REQUEST_TOKENS, done)
    finally:
        target.sample_on_device(None)
    return requests


def answer(target: Target, todo: list[Todo], ds: Dataset, max_new_tokens: int, progress: Progress) -> Report:
    """The target answers todo's prompts greedily; each finished answer is stored at once."""
    report = Report()
    task = progress.add_task("target answers", total=len(todo))

    def store(item: Todo, ans: list[int]) -> None:
        ds.append(item.key, item.group, item.prompt + ans, len(item.prompt))
        report.sequences += 1
        report.tokens += len(ans)
        progress.update(task, advance=1, description=f"target answers ({report.tokens} tokens)")

    t0 = time.perf_counter()
    pending = iter(todo)
    try:
        continue_prompts(target, lambda: next(pending, None), lambda seqs: target.logits(len(seqs)).argmax(axis=1),
                         max_new_tokens, store)
    finally:
        ds.save()
    report.seconds = time.perf_counter() - t0
    return report


def capture_params(params: TargetParams) -> TargetParams:
    """The context capture() packs sequences in. On a GPU a prefill of a few hundred tokens is too small to keep it
    busy (an H200 spent its capture launching kernels, py-spy --native), so sequences go up to 2048 tokens to a batch;
    a CPU is busy with any, and there the packed batch's attention (each token against all of it, masked) would
    cost."""
    n_batch = 2048 if params.n_gpu_layers else params.n_batch
    return replace(params, n_seq=min(CAPTURE_SEQUENCES, n_batch), n_batch=n_batch, kv_unified=True)


def capture(target: Target, ds: Dataset, progress: Progress) -> Report:
    """The features of every sequence that has none yet: prefills over prompt + answer, far cheaper than capturing
    while answering token by token; several sequences to a batch in a kv_unified context (capture_params)."""
    report = Report()
    t0 = time.perf_counter()
    task = progress.add_task("capture features", total=len(ds.sequences) - ds.captured)
    pack: list[list[int]] = []

    def flush() -> None:
        target.clear()
        if len(pack) == 1:  # also one longer than a batch
            target.decode(pack[0], 0, all_logits=False)
        else:
            target.prefill(pack)
        (codes, scales), start = target.capture.rows_e4m3(), 0
        for tokens in pack:
            end = start + len(tokens)
            ds.append_features(codes[start:end], scales[start:end])
            start = end
            report.sequences += 1
            report.tokens += len(tokens)
        progress.update(task, advance=len(pack))
        pack.clear()

    most = target.n_seq if target.kv_unified else 1
    for tokens in ds.token_lists(ds.captured):
        if pack and (len(pack) == most or sum(map(len, pack)) + len(tokens) > target.n_batch):
            flush()
        pack.append(tokens)
    if pack:
        flush()
    target.clear()
    ds.save()
    report.seconds = time.perf_counter() - t0
    return report
