"""Running the app under uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from dflash_local.console import console
from dflash_local.engine import Engine
from dflash_local.serve.app import Api, Defaults
from dflash_local.serve.worker import Worker


class _Server(uvicorn.Server):
    """Cancels the generations when told to stop, so that open streams end now rather than at the graceful timeout."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # from a thread: this is a signal handler, which may have interrupted the queue's lock in this thread
        threading.Thread(target=self.worker.cancel_all, daemon=True).start()
        super().handle_exit(sig, frame)


class _Stopped(Exception):
    """A stop signal, after uvicorn's graceful shutdown."""


@contextmanager
def _stop_signals() -> Iterator[None]:
    """uvicorn shuts down on SIGINT and SIGTERM, then raises the signal again under the handlers found before it:
    these turn it into _Stopped, so that the caller still closes the models (SIGTERM's default would just end the
    process)."""

    def stop(sig: int, frame: object) -> None:
        raise _Stopped

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        console.print("[dim]stopped[/dim]")
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def serve(engine: Engine, model: str, host: str, port: int, api_key: str | None, queue_size: int,
          defaults: Defaults) -> None:
    """Serves the OpenAI-compatible API on host:port until stopped; the worker has ended when this returns."""
    worker = Worker(engine, queue_size)
    api = Api(worker, model, defaults, api_key)
    # a stream still open at shutdown is cut after this long (its generation was cancelled at the signal)
    config = uvicorn.Config(api.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    console.print(f"[dim]serving {model} at http://{host}:{port}/v1 (one request at a time, {queue_size} may wait; "
                  f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops[/dim]", highlight=False)
    with _stop_signals():
        _Server(config, worker).run()
