"""Training prompts that need no network: the built-in set shipped with the package, or a file."""

from __future__ import annotations

from pathlib import Path

from dflash_local.bench.prompts import Prompt, load_prompts
from dflash_local.errors import UserError

# coding (chat, and raw completion of Python stubs), math, explanations, chat; no topic of `dflash bench`'s chat
# set, so that benchmark stays held out
BUILTIN = Path(__file__).with_name("builtin_prompts.jsonl")


def training_prompts(source: str, n: int | None = None) -> list[Prompt]:
    """The first n prompts of `builtin` or of a .jsonl/.txt file (read as `dflash bench --prompts` reads it)."""
    if source in ("humaneval", "chat"):
        raise UserError(f"--prompts {source} is a benchmark set, kept for evaluation: train on builtin or a file")
    path = BUILTIN if source == "builtin" else source
    return load_prompts(str(path), n or 1 << 30)
