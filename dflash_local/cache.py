"""The user's cache folder: what dflash-local measures or builds once and keeps (pass costs, acceptance, built-in
models assembled from their parts)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


CACHE_ENV = "DFLASH_CACHE"


def cache_dir() -> Path:
    """$DFLASH_CACHE, else $XDG_CACHE_HOME/dflash-local, else ~/.cache/dflash-local."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec: a relative path is invalid and ignored
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "dflash-local"


def read_json(name: str) -> dict[str, Any]:
    """A JSON object kept in the cache; empty when missing or unreadable (a cache is never worth an error)."""
    try:
        doc = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_json(name: str, doc: dict[str, Any]) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file; a cache that cannot be written
    (read-only home) is skipped."""
    path = cache_dir() / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
