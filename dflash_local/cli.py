"""The `dflash` command line: run, convert, bench, train (and doctor)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from dflash_local import __version__
from dflash_local.console import command_errors, console, note
from dflash_local.bench.cli import bench
from dflash_local.convert.cli import app as convert_app
from dflash_local.model_registry import DEFAULT_MODEL
from dflash_local.train.cli import train
from dflash_local.tree import TREE_SIZE

if TYPE_CHECKING:
    from dflash_local.engine import Engine
    from dflash_local.native import Drafter
    from dflash_local.sampling import SamplingParams
    from dflash_local.target import Target

app = typer.Typer(
    name="dflash",
    help="Lossless DFlash speculative decoding for local GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(convert_app, name="convert")
app.command()(train)
app.command()(bench)


def _version(value: bool) -> None:
    if value:
        from dflash_local import native

        console.print(f"dflash-local {__version__} (ggml {native.build_ggml_version()}, devices: "
                      f"{', '.join(native.devices())})")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version, the ggml it was built against and the devices."),
) -> None:
    """Lossless DFlash speculative decoding for local GGUF models."""


@app.command()
def doctor() -> None:
    """Check the native helper: the ggml it was built against, the ggml loaded, the devices."""
    from dflash_local import native
    from dflash_local.target import available_cores

    built, loaded = native.build_ggml_version(), native.loaded_ggml_version()
    console.print(f"dflash-local {__version__}")
    console.print(f"native helper: {native.lib._name}")
    console.print(f"ggml built against: {built}; loaded by llama-cpp-python: {loaded}")
    console.print(f"devices: {', '.join(native.devices())}")
    console.print(f"CPU threads by default: {available_cores()} (the cores this process may use)")
    if built != loaded:
        console.print("[red]ggml versions differ: reinstall dflash-local against this llama-cpp-python[/red]")
        raise typer.Exit(1)


@app.command(name="models")
def list_models() -> None:
    """List the built-in models, which `dflash run NAME` (and bench, train) take in place of a GGUF file."""
    from rich.filesize import decimal
    from rich.table import Table

    from dflash_local import model_files, models
    from dflash_local.model_registry import MODELS

    table = Table(title="built-in models", caption="a model of several parts is assembled on first use in "
                  f"{model_files.cache_dir() / 'models'}")
    for col in ("name", "description", "installed", "size", "shipped drafter"):
        table.add_column(col, no_wrap=True)
    to_install = []
    for model in MODELS.values():
        state = models.installed(model)
        drafter = models.shipped_drafter(model)
        table.add_row(model.name + (" (default)" if model.name == DEFAULT_MODEL else ""), model.description, state,
                      decimal(model.size), drafter.name if drafter else "none")
        if state.startswith("no"):
            to_install.append(f"{model.name}: {model.install}")
    Console(width=None if sys.stdout.isatty() else 150).print(table)  # a pipe gets every column whole
    for line in to_install:
        console.print(f"install {line}", markup=False, highlight=False)


_TARGET = typer.Argument(None, help=f"Target GGUF, or a built-in model's name (`dflash models`; default: "
                         f"{DEFAULT_MODEL}).")
_DRAFTER = typer.Option(None, "--drafter", "-d", help="DFlash drafter GGUF (default: <target>-dflash*.gguf next to the "
                        "target, or the one shipped for it).")
# the generation and model options of `run` and `serve` (serve: the defaults of requests that leave them out)
_SHARED: dict[str, tuple[type, Any]] = {
    "max_tokens": (int, typer.Option(256, "--max-tokens", "-n", min=1)),
    "temp": (float, typer.Option(0.0, "--temp", min=0.0, help="Temperature; 0 is greedy.")),
    "top_k": (int, typer.Option(0, "--top-k", min=0)),
    "top_p": (float, typer.Option(1.0, "--top-p", min=0.0, max=1.0)),
    "min_p": (float, typer.Option(0.0, "--min-p", min=0.0, max=1.0)),
    "seed": (int, typer.Option(None, "--seed", help="Seed for sampling (runs with the same seed repeat).")),
    "block_size": (int, typer.Option(None, "--block-size", help="Draft block size (<= the drafter's trained size).")),
    "tree_size": (int, typer.Option(TREE_SIZE, "--tree-size", min=0, max=TREE_SIZE, help="The most drafts a tree holds "
                                    "(each step verifies as many as measured speed favours); 0: one chain.")),
    "ctx_size": (int, typer.Option(4096, "--ctx-size", "-c", min=16)),
    "n_gpu_layers": (int, typer.Option(0, "--n-gpu-layers", "-ngl", help="Target layers to offload to the GPU.")),
    "threads": (int, typer.Option(0, "--threads", "-t", min=0,
                                  help="CPU threads (0: the cores this process may use).")),
    "tensor_split": (str, typer.Option(None, "--tensor-split", help="Split over GPUs, e.g. 3,1.")),
    "main_gpu": (int, typer.Option(0, "--main-gpu")),
    "device": (str, typer.Option(None, "--device", help="ggml device for the drafter (CPU, CUDA0, ...).")),
    "no_draft": (bool, typer.Option(False, "--no-draft", help="Run the target alone.")),
}


def _shared_options(command: Callable[..., None]) -> Callable[..., None]:
    """Adds the _SHARED options to a command's signature, which Typer reads; the command gets them as **options."""
    sig = inspect.signature(command)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in _SHARED.items()]
    command.__signature__ = sig.replace(parameters=own + shared)  # type: ignore[attr-defined]
    command.__annotations__ |= {name: kind for name, (kind, _) in _SHARED.items()}
    return command


@app.command()
@_shared_options
def run(
    target: str = _TARGET,
    drafter: Path = _DRAFTER,
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    file: Path = typer.Option(None, "--file", "-f", help="Read the prompt from a file."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Raw completion: no chat template."),
    **options: Any,
) -> None:
    """Generate with TARGET, drafting blocks with a DFlash drafter (lossless)."""
    from dflash_local import models

    with command_errors():
        _run(models.resolve_target(target), drafter, prompt, file, no_chat_template, **options)


@app.command()
@_shared_options
def serve(
    target: str = _TARGET,
    drafter: Path = _DRAFTER,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    api_key: str = typer.Option(None, "--api-key", envvar="DFLASH_API_KEY",
                                help="Answer only requests that carry it (Authorization: Bearer KEY)."),
    queue_size: int = typer.Option(64, "--queue-size", min=1, help="Requests that may wait; more are answered 503."),
    **options: Any,
) -> None:
    """Serve TARGET over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions), one request at a time;
    the generation options are the defaults of requests that leave them out."""
    from dflash_local import models

    with command_errors():
        _serve(models.resolve_target(target), drafter, host, port, api_key, queue_size, **options)


def _run(target: Path, drafter: Path | None, prompt: str | None, file: Path | None, no_chat_template: bool,
         max_tokens: int, temp: float, top_k: int, top_p: float, min_p: float, seed: int | None,
         **model_args: Any) -> None:
    from dflash_local import native
    from dflash_local.errors import UsageError, UserError

    native.exit_on_ggml_abort()  # what llama.cpp asserts on in a model file that the checks before it missed
    if prompt is not None and file is not None:
        raise UsageError("give either --prompt or --file, not both")
    if file is not None:
        if not file.is_file():
            raise UserError(f"prompt file not found: {file}")
        prompt = file.read_text()
        if not prompt.strip():
            raise UserError(f"the prompt file {file} is empty")
    with open_engine(target, drafter, **model_args) as engine:
        _chat_or_prompt(engine.target, engine.drafter, engine, prompt, no_chat_template, max_tokens,
                        _sampling(temp, top_k, top_p, min_p, seed))


def _serve(target: Path, drafter: Path | None, host: str, port: int, api_key: str | None, queue_size: int,
           max_tokens: int, temp: float, top_k: int, top_p: float, min_p: float, seed: int | None,
           **model_args: Any) -> None:
    from dflash_local.serve.app import Defaults
    from dflash_local.serve.server import serve

    with open_engine(target, drafter, **model_args) as engine:
        serve(engine, target.stem, host, port, api_key, queue_size,
              Defaults(max_tokens, _sampling(temp, top_k, top_p, min_p, seed)))


def _sampling(temp: float, top_k: int, top_p: float, min_p: float, seed: int | None) -> SamplingParams:
    from dflash_local.sampling import SamplingParams

    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


@contextmanager
def open_engine(target: Path, drafter: Path | None, block_size: int | None, tree_size: int, ctx_size: int,
                n_gpu_layers: int, threads: int, tensor_split: str | None, main_gpu: int, device: str | None,
                no_draft: bool) -> Iterator[Engine]:
    """The engine over the target and its drafter (given, next to the target, shipped, or none), saying which; the
    models are closed on the way out."""
    from dflash_local import models
    from dflash_local.engine import Engine
    from dflash_local.errors import UsageError
    from dflash_local.loader import open_models
    from dflash_local.target import TargetParams

    why = "given with --drafter"
    if not no_draft and drafter is None:
        drafter = models.find_drafter(target)
        why = "shipped for it" if drafter and drafter.parent == models.SHIPPED_DRAFTERS else "found next to it"
    try:
        split = tuple(float(x) for x in tensor_split.split(",")) if tensor_split else ()
    except ValueError:
        raise UsageError(f"--tensor-split takes comma-separated numbers, e.g. 3,1, not {tensor_split!r}") from None
    params = TargetParams(n_ctx=ctx_size, n_gpu_layers=n_gpu_layers, n_threads=threads, main_gpu=main_gpu,
                          tensor_split=split)
    tg, dr = open_models(target, None if no_draft else drafter, params, device, tree_size)
    try:
        if dr is None and not no_draft:
            note(f"no drafter found for {target.name} ({target.stem}-dflash*.gguf): running the target alone. "
                 "Make one with `dflash train`.")
        elif dr is not None:
            console.print(f"[dim]drafter: {drafter} ({why})[/dim]", highlight=False)
        yield Engine(tg, dr, block_size, tree_size=tree_size)
    finally:  # in this order: the drafter, then the target's context, capture and model
        if dr is not None:
            dr.close()
        tg.close()


def _chat_or_prompt(tg: Target, dr: Drafter | None, engine: Engine, prompt: str | None, no_chat_template: bool,
                    max_tokens: int, sampling: SamplingParams) -> None:
    """One answer to the prompt, or a chat when there is none."""

    def generate(messages: list[tuple[str, str]]) -> str:
        text = messages[-1][1] if no_chat_template else tg.chat_prompt(messages)
        if text is None:
            note("the model has no chat template: raw completion")
            text = messages[-1][1]
        stream = TokenStream(tg)
        gen = engine.generate(tg.tokenize(text), max_tokens, sampling, on_tokens=stream.write)
        stream.close()
        s = gen.stats
        shares = ""
        if dr and s.t_decode > 0:
            shares = (f", drafter {s.t_draft / s.t_decode:.0%}, target {s.t_target / s.t_decode:.0%}"
                      f", tau {s.tau:.2f}")
        ended = {"interrupted": ", interrupted", "context": ", stopped: the context is full (raise --ctx-size)"}
        console.print(f"[dim]{s.generated} tokens, {s.decode_tps:.1f} tok/s (prompt {s.prompt_tokens} tokens in "
                      f"{s.t_prefill:.2f} s){shares}{ended.get(gen.stop, '')}[/dim]", highlight=False)
        return stream.text

    if prompt is not None:
        generate([("user", prompt)])
        return
    console.print("[dim]chat: Ctrl-C stops an answer; an empty line or Ctrl-D quits[/dim]")
    history: list[tuple[str, str]] = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: the chat ends, its prompt's line too
            print()
            break
        if not line.strip():
            break
        history.append(("user", line))
        history.append(("assistant", generate(history)))


class TokenStream:
    """Prints tokens as they arrive, holding back bytes of unfinished UTF-8 characters."""

    def __init__(self, target: "Target"):
        import codecs

        self.target = target
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def write(self, tokens: list[int]) -> None:
        chunk = self.decoder.decode(b"".join(self.target.piece(t) for t in tokens))
        self.text += chunk
        sys.stdout.write(chunk)
        sys.stdout.flush()

    def close(self) -> None:
        chunk = self.decoder.decode(b"", final=True)
        self.text += chunk
        sys.stdout.write(chunk + "\n")
        sys.stdout.flush()
