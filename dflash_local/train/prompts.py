"""Prompt sources that need no network: the built-in set shipped with the package, or a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

from dflash_local.errors import UserError

BUILTIN = Path(__file__).with_name("builtin_prompts.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, each with a non-empty string "prompt"."""
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f'{path}:{n}: expected an object with a non-empty string "prompt"')
        rows.append(row)
    if not rows:
        raise UserError(f"{path} has no prompts")
    return rows


def builtin_prompts(split: str) -> list[str]:
    """The built-in prompts (coding, math, explanations, chat) of one split: "train", or "eval" (held out)."""
    return [r["prompt"] for r in read_jsonl(BUILTIN) if r["split"] == split]


def training_prompts(source: str) -> list[str]:
    """`builtin` or a JSONL file of {"prompt": ...} lines."""
    if source == "builtin":
        return builtin_prompts("train")
    return [r["prompt"] for r in read_jsonl(Path(source))]
