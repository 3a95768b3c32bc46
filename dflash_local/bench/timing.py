"""Ways of doing one thing timed side by side in one process, for the bench scripts (bench/*.py)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def side_by_side_parser() -> argparse.ArgumentParser:
    """TARGET and DRAFTER, and the options every such script takes: --repeats, --threads, -ngl, --device (the
    drafter's), --json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path)
    return ap


def side_by_side_ms(ways: dict[str, Callable[[], object]], prepare: Callable[[str], object],
                    repeats: int) -> tuple[dict[str, list[float]], dict[str, float], dict[str, object]]:
    """Each way's times in ms over repeats + 1 rounds (the first a warm-up), the ways taking turns within a round, each
    after prepare(way), untimed; their medians past the warm-up; and each way's last result."""
    ms: dict[str, list[float]] = {way: [] for way in ways}
    results: dict[str, object] = {}
    for _ in range(repeats + 1):
        for way, run in ways.items():
            prepare(way)
            t = time.perf_counter()
            results[way] = run()
            ms[way].append((time.perf_counter() - t) * 1e3)
    return ms, {way: statistics.median(times[1:]) for way, times in ms.items()}, results
