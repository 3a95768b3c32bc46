"""The `dflash` command line: run, convert, bench, train (and doctor)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from dflash_local import __version__
from dflash_local.bench.cli import bench
from dflash_local.convert.cli import app as convert_app
from dflash_local.train.cli import train
from dflash_local.tree import TREE_SIZE

if TYPE_CHECKING:
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
console = Console(stderr=True, soft_wrap=True)  # stdout carries only the generated text


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


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


@app.command()
def run(
    target: Path = typer.Argument(None, help="Target GGUF (default: the built-in SmolLM2-135M-Instruct Q4_1)."),
    drafter: Path = typer.Option(None, "--drafter", "-d", help="DFlash drafter GGUF (default: <target>-dflash*.gguf "
                                 "next to the target, or the one shipped for the default model)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    file: Path = typer.Option(None, "--file", "-f", help="Read the prompt from a file."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Raw completion: no chat template."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(0.0, "--min-p", min=0.0, max=1.0),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling (runs with the same seed repeat)."),
    block_size: int = typer.Option(None, "--block-size", help="Draft block size (<= the drafter's trained size)."),
    tree_size: int = typer.Option(TREE_SIZE, "--tree-size", min=0, max=TREE_SIZE, help="The most drafts a tree "
                                  "holds (each step verifies as many as measured speed favours); 0: one chain."),
    ctx_size: int = typer.Option(4096, "--ctx-size", "-c", min=16),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", "-ngl", help="Target layers to offload to the GPU."),
    threads: int = typer.Option(0, "--threads", "-t", min=0, help="CPU threads (0: the cores this process may use)."),
    tensor_split: str = typer.Option(None, "--tensor-split", help="Split over GPUs, e.g. 3,1."),
    main_gpu: int = typer.Option(0, "--main-gpu"),
    device: str = typer.Option(None, "--device", help="ggml device for the drafter (CPU, CUDA0, ...)."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Run the target alone."),
) -> None:
    """Generate with TARGET, drafting blocks with a DFlash drafter (lossless)."""
    args = dict(locals())
    from dflash_local.errors import UserError

    try:
        _run(**args)
    except UserError as e:
        raise _fail(str(e)) from None


def _run(target: Path | None, drafter: Path | None, prompt: str | None, file: Path | None, no_chat_template: bool,
         max_tokens: int, temp: float, top_k: int, top_p: float, min_p: float, seed: int | None,
         block_size: int | None, tree_size: int, ctx_size: int, n_gpu_layers: int, threads: int,
         tensor_split: str | None, main_gpu: int, device: str | None, no_draft: bool) -> None:
    from dflash_local import models, native
    from dflash_local.engine import Engine
    from dflash_local.errors import UserError
    from dflash_local.loader import open_models
    from dflash_local.sampling import SamplingParams
    from dflash_local.target import TargetParams

    native.exit_on_ggml_abort()  # what llama.cpp asserts on in a model file that the checks before it missed
    if prompt is not None and file is not None:
        raise UserError("give either --prompt or --file, not both")
    if file is not None:
        if not file.is_file():
            raise UserError(f"prompt file not found: {file}")
        prompt = file.read_text()
    target = target or models.default_target()
    if not target.is_file():
        raise UserError(f"target model not found: {target}")
    if not no_draft and drafter is None:
        drafter = models.find_drafter(target)
    split = tuple(float(x) for x in tensor_split.split(",")) if tensor_split else ()
    params = TargetParams(n_ctx=ctx_size, n_gpu_layers=n_gpu_layers, n_threads=threads, main_gpu=main_gpu,
                          tensor_split=split)
    tg, dr = open_models(target, None if no_draft else drafter, params, device, tree_size)
    if dr is None and not no_draft:
        console.print(f"[yellow]note:[/yellow] no drafter found for {target.name} ({target.stem}-dflash*.gguf): "
                      "running the target alone. Make one with `dflash train`.", highlight=False)
    engine = Engine(tg, dr, block_size, tree_size=tree_size)
    sampling = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)

    def generate(messages: list[tuple[str, str]]) -> str:
        text = messages[-1][1] if no_chat_template else tg.chat_prompt(messages)
        if text is None:
            console.print("[yellow]note:[/yellow] the model has no chat template: raw completion", highlight=False)
            text = messages[-1][1]
        stream = TokenStream(tg)
        gen = engine.generate(tg.tokenize(text), max_tokens, sampling, on_tokens=stream.write)
        stream.close()
        s = gen.stats
        shares = ""
        if dr and s.t_decode > 0:
            shares = (f", drafter {s.t_draft / s.t_decode:.0%}, target {s.t_target / s.t_decode:.0%}"
                      f", tau {s.tau:.2f}")
        console.print(f"[dim]{s.generated} tokens, {s.decode_tps:.1f} tok/s (prompt {s.prompt_tokens} tokens in "
                      f"{s.t_prefill:.2f} s){shares}{', interrupted' if gen.stop == 'interrupted' else ''}[/dim]",
                      highlight=False)
        return stream.text

    if prompt is not None:
        generate([("user", prompt)])
        return
    console.print("[dim]chat: empty line or Ctrl-D to quit[/dim]")
    history: list[tuple[str, str]] = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
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
