"""The one thread that owns the models: requests wait in a bounded queue and are generated one at a time, their text
streamed back to the event loop through asyncio queues."""

from __future__ import annotations

import asyncio
import codecs
import queue
import threading
from dataclasses import dataclass, field

from dflash_local.engine import Engine, Generation
from dflash_local.errors import UserError
from dflash_local.sampling import SamplingParams


class QueueFull(Exception):
    """Every slot of the request queue is taken."""


@dataclass
class Job:
    """One request: a chat (messages) or a raw prompt, and where its events go."""

    messages: list[tuple[str, str]] | None
    prompt: str | None
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    # ("start", n_prompt_tokens), ("text", delta), ("done", Generation, finish_reason) or ("error", status, message)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class TextCutter:
    """Decodes tokens to text, holding back what could still become a stop string (or half a UTF-8 character);
    cuts the text at the first stop string."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, data: bytes, final: bool = False) -> str:
        """The next piece of text that is safe to send."""
        self.text += self.decoder.decode(data, final=final)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.stopped = True
        end = len(self.text) if self.stopped or final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class Worker:
    """Generates the queued jobs with `engine`, one at a time, in a thread of its own."""

    def __init__(self, engine: Engine, queue_size: int):
        self.engine = engine
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.current: Job | None = None  # the job being generated
        self.thread = threading.Thread(target=self._loop, name="dflash-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def cancel_all(self) -> None:
        """Answers the waiting jobs 503 and stops the one running at its next step (the server is stopping)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.emit("error", 503, "the server is shutting down")
        if (job := self.current) is not None:
            job.cancelled.set()

    def stop(self) -> None:
        """Cancels every job and ends the thread."""
        self.cancel_all()
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                job.emit("error", 499, "the client closed the request")
                continue
            self.current = job
            try:
                self._generate(job)
            except UserError as e:  # a prompt longer than the context, ...
                job.emit("error", 400, str(e))
            except Exception as e:  # noqa: BLE001 -- the thread serves the next request whatever failed
                job.emit("error", 500, f"{type(e).__name__}: {e}")
            finally:
                self.current = None

    def _generate(self, job: Job) -> None:
        tg = self.engine.target
        text = job.prompt
        if job.messages is not None:
            text = tg.chat_prompt(job.messages)
            if text is None:
                raise UserError("the model has no chat template: use /v1/completions")
        tokens = tg.tokenize(text)
        if len(tokens) >= tg.n_ctx:
            raise UserError(f"the prompt has {len(tokens)} tokens but the context holds {tg.n_ctx}: "
                            "raise --ctx-size or shorten the prompt")
        job.emit("start", len(tokens))
        cutter = TextCutter(job.stop)

        def on_tokens(new: list[int]) -> bool:
            delta = cutter.feed(b"".join(tg.piece(t) for t in new))
            if delta:
                job.emit("text", delta)
            return not (cutter.stopped or job.cancelled.is_set())

        gen: Generation = self.engine.generate(tokens, job.max_tokens, job.sampling, on_tokens=on_tokens)
        if not cutter.stopped and (delta := cutter.feed(b"", final=True)):
            job.emit("text", delta)
        finish = "stop" if cutter.stopped or gen.stop == "eog" else "length"
        job.emit("done", gen, finish)
