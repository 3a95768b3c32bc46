"""One place for what the commands print on stderr and how they end.

stdout carries only what a command produces (generated text, result tables); notes, progress and errors go to
stderr. A UserError ends a command with one `error:` line and its exit code (1: bad input, 2: usage), as does an error
of the native helper (bad input, 1); Ctrl-C ends it with 130 after what was done is kept.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from dflash_local.errors import NativeError, UserError

console = Console(stderr=True, soft_wrap=True)


def note(message: str) -> None:
    # escaped: a message may hold brackets, such as pip's extras ("dflash-local[coder]")
    console.print(f"[yellow]note:[/yellow] {escape(message)}", highlight=False)


def error(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)


@contextmanager
def command_errors() -> Iterator[None]:
    """The body of a command: its errors a person can act on end it with one line and an exit code. llama.cpp's
    libraries are loaded first: numpy (or torch, sentencepiece) loaded before them crashed llama.cpp's model load on
    the lent H100 and H200 machines."""
    importlib.import_module("llama_cpp")
    try:
        yield
    except UserError as e:
        error(str(e))
        raise typer.Exit(e.exit_code) from None
    except NativeError as e:
        error(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted", style="dim")
        raise typer.Exit(130) from None
