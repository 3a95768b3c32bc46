"""What a result was measured on: machine, software, commit, files, memory."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cmd(*args: str) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """NVIDIA GPUs as "name, total memory" (empty without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = _cmd("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader")
    return out.splitlines() if out else []


def gpu_used_mb() -> float | None:
    """Memory in use on all NVIDIA GPUs, device-wide (MiB), or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = _cmd("nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits")
    return float(sum(float(x) for x in out.split())) if out else None


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def git_commit() -> dict[str, object] | None:
    """The checkout's commit and whether it has local changes: the source tree's where dflash_local runs from one,
    else the current folder's (an installed package run from its checkout); None outside a git checkout."""
    repo = REPO if (REPO / ".git").exists() else Path.cwd()
    commit = _cmd("git", "-C", str(repo), "rev-parse", "HEAD")
    status = _cmd("git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)} if commit else None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    from dflash_local import native

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpus": gpus(),
        "ggml_devices": native.devices(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": _version("llama-cpp-python"),
        "dflash_local": _version("dflash-local"),
    }


def file_info(path: Path) -> dict[str, object]:
    return {"path": str(path), "name": path.name, "size_bytes": path.stat().st_size}


def script_header(schema: str) -> dict[str, object]:
    """The first keys of a bench script's JSON: schema, UTC time, the command (python and its arguments), machine,
    commit."""
    return {"schema": schema, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *sys.argv]), "machine": machine_info(), "git": git_commit()}
