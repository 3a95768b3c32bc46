"""`dflash convert ...` commands."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer

from dflash_local.console import command_errors, console
from dflash_local.errors import UsageError

app = typer.Typer(help="Convert DFlash drafters and AWQ targets to GGUF.", no_args_is_help=True)


class Format(str, Enum):
    gguf = "gguf"


class OutType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class TargetOutType(str, Enum):
    q4_1 = "q4_1"
    f16 = "f16"


@app.command()
def drafter(
    src: str = typer.Argument(..., help="Hugging Face DFlash checkpoint: a local folder or a Hub repo id."),
    to: Format = typer.Option(..., "--to", help="Output format."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output file (default: ./NAME-OUTTYPE.gguf)."),
    target: Path | None = typer.Option(None, "--target", help="The target model's GGUF: its tokenizer is copied "
                                       "into the drafter and its shapes are checked (required)."),
    outtype: OutType = typer.Option(OutType.f16, "--outtype", help="Type of the weight matrices (norms stay f32)."),
) -> None:
    """Convert a DFlash drafter checkpoint to GGUF (architecture `dflash`, loadable by llama.cpp)."""
    # imported here: torch and friends would slow down every other `dflash` command
    from dflash_local.convert.hf import convert_hf_to_gguf

    if target is None:
        with command_errors():
            raise UsageError("the target model's GGUF is required (--target TARGET.gguf): the drafter carries the "
                             "target's tokenizer, and its shapes are checked against the target's")
    out = out or _default_out(src, outtype.value)
    _convert(lambda: convert_hf_to_gguf(src, out, target, outtype.value, progress=True))


@app.command()
def target(
    src: str = typer.Argument(..., help="AutoAWQ (4-bit GEMM) checkpoint of a llama, qwen2 or qwen3 model: a local "
                              "folder or a Hub repo id."),
    to: Format = typer.Option(..., "--to", help="Output format."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output file (default: ./NAME-OUTTYPE.gguf)."),
    outtype: TargetOutType = typer.Option(TargetOutType.q4_1, "--outtype", help="q4_1: the AWQ codes carried over "
                                          "exactly (scales and offsets in f16); f16: the AWQ weights dequantized."),
) -> None:
    """Convert an AWQ target model to GGUF, for `dflash run`, `bench` and `train`."""
    from dflash_local.convert.awq_target import convert_awq_target

    out = out or _default_out(src, outtype.value)
    _convert(lambda: convert_awq_target(src, out, outtype.value, progress=True))


def _default_out(src: str, outtype: str) -> Path:
    return Path(f"{Path(src).resolve().name}-{outtype}.gguf")


def _convert(convert: Callable[[], Path]) -> None:
    """Run a conversion as a command: its warnings printed, its errors one line, the file it wrote named."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with command_errors():
                path = convert()
        finally:
            for w in caught:
                console.print(f"warning: {w.message}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
