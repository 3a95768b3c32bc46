"""The OpenAI-compatible routes: requests checked and queued for the worker, answers in OpenAI's shapes (whole or as
server-sent events), with llama-server's `timings`; errors in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dflash_local.engine import Generation
from dflash_local.sampling import SamplingParams
from dflash_local.serve.worker import Job, QueueFull, Worker

RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Defaults:
    """What a request leaves out: the command line's generation options."""

    max_tokens: int
    sampling: SamplingParams


class ApiError(HTTPException):
    """An error answered in OpenAI's shape (status, message, headers), as every HTTPException is here."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status,
                        headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, exc.headers)


# ---- request fields ------------------------------------------------------------------------------
def _number(body: dict[str, Any], name: str, default: Any, kind: type, lo: float, hi: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int to Python, not to JSON; an int is fine where a float is asked for
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}")
    if value < lo or (hi is not None and value > hi):
        raise ApiError(400, f"'{name}' must be in {lo}..{hi}" if hi is not None else f"'{name}' must be at least {lo}")
    return kind(value)


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings")
    return stop


def _content(content: Any) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "a message's 'content' must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "each message needs a 'role' (a string) and a 'content'")
    return [(m["role"], _content(m.get("content"))) for m in messages]


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string")
    return prompt


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1")
    return body


def _sampling(body: dict[str, Any], d: SamplingParams) -> SamplingParams:
    return replace(d, temperature=_number(body, "temperature", d.temperature, float, 0.0),
                   top_p=_number(body, "top_p", d.top_p, float, 0.0, 1.0),
                   top_k=_number(body, "top_k", d.top_k, int, 0),
                   min_p=_number(body, "min_p", d.min_p, float, 0.0, 1.0),
                   seed=_number(body, "seed", d.seed, int, -2**63))


# ---- answers -------------------------------------------------------------------------------------
def usage(gen: Generation) -> dict[str, int]:
    s = gen.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated,
            "total_tokens": s.prompt_tokens + s.generated}


def timings(gen: Generation) -> dict[str, float]:
    """As llama-server reports them, with DFlash's tau and the drafter's and target's shares of the decode time."""
    s = gen.stats
    t = {"prompt_n": s.prompt_tokens, "prompt_ms": s.t_prefill * 1e3,
         "prompt_per_second": s.prompt_tokens / s.t_prefill if s.t_prefill > 0 else 0.0,
         "predicted_n": s.generated, "predicted_ms": s.t_decode * 1e3, "predicted_per_second": s.decode_tps,
         "tau": s.tau}
    if s.t_decode > 0:
        t |= {"draft_share": s.t_draft / s.t_decode, "target_share": s.t_target / s.t_decode}
    return t


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancels the job when its client disconnects (the body has been read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


class Api:
    """The routes over one worker; `model` is the name the answers carry."""

    def __init__(self, worker: Worker, model: str, defaults: Defaults, api_key: str | None):
        self.worker, self.model, self.defaults, self.api_key = worker, model, defaults, api_key
        self.created = int(time.time())

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.worker.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.worker.stop)

        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "busy": self.worker.current is not None,
                             "queued": self.worker.jobs.qsize()})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "dflash-local"}]})

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        body = await _body(request)
        return await self._answer(request, body, _messages(body), None, "chat.completion", "chatcmpl",
                                  lambda text, first: {"delta": {"role": "assistant", "content": text} if first
                                                       else {"content": text}},
                                  lambda text: {"message": {"role": "assistant", "content": text}})

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _body(request)
        return await self._answer(request, body, None, _prompt(body), "text_completion", "cmpl",
                                  lambda text, first: {"text": text, "logprobs": None},
                                  lambda text: {"text": text, "logprobs": None})

    async def _answer(self, request: Request, body: dict[str, Any], messages: list[tuple[str, str]] | None,
                      prompt: str | None, obj: str, prefix: str, chunk: Callable[[str, bool], dict[str, Any]],
                      whole: Callable[[str], dict[str, Any]]) -> Response:
        """Queues the request, waits for its start (or its error), then answers whole or streams."""
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false")
        body.setdefault("max_tokens", body.get("max_completion_tokens"))  # the newer name for it
        job = Job(messages, prompt, _number(body, "max_tokens", self.defaults.max_tokens, int, 1),
                  _sampling(body, self.defaults.sampling), _stop(body), asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is busy: every slot of its queue is taken",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        # until the stream takes over (it sees its client leave when a send fails), a client that leaves cancels
        watch = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            event = await job.events.get()
            if event[0] == "error":
                return error_response(event[1], event[2])
            head = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": self.model}
            if stream:
                return StreamingResponse(self._events(job, {**head, "object": f"{obj}.chunk" if messages else obj},
                                                      chunk), media_type="text/event-stream")
            text = []
            while (event := await job.events.get())[0] == "text":
                text.append(event[1])
        finally:
            watch.cancel()
        if event[0] == "error":
            return error_response(event[1], event[2])
        _, gen, finish = event
        return JSONResponse({**head, "object": obj, "choices": [{"index": 0, **whole("".join(text)),
                                                                  "finish_reason": finish}],
                             "usage": usage(gen), "timings": timings(gen)})

    async def _events(self, job: Job, head: dict[str, Any],
                      chunk: Callable[[str, bool], dict[str, Any]]) -> AsyncIterator[str]:
        """The answer as server-sent events; a client that disconnects cancels the generation (at its next step)."""

        def sse(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        try:
            first = True
            while (event := await job.events.get())[0] == "text":
                yield sse({**head, "choices": [{"index": 0, **chunk(event[1], first), "finish_reason": None}]})
                first = False
            if event[0] == "error":
                yield sse({"error": {"message": event[2], "type": "server_error", "param": None,
                                     "code": event[1]}})
                return
            _, gen, finish = event
            yield sse({**head, "choices": [{"index": 0, **chunk("", first), "finish_reason": finish}],
                       "usage": usage(gen), "timings": timings(gen)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()
