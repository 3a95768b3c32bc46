"""A short `dflash run` as a new user's first try: the same command with the drafter and with --no-draft, taken by
turns in new processes (so the drafter's calibration, cached after the first run, and llama.cpp's load are those a
person sees), the decode tok/s each printed.

    python bench/short_run.py [--repeats 5] [--json out.json] -- [dflash run arguments]

e.g. `python bench/short_run.py --json bench/results/cpu-short-run-smollm2-DATE.json -- --max-tokens 60
-p "What is a binary search?"`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dflash_local.bench.machine import git_commit, machine_info

TPS = re.compile(r"(\d+) tokens, ([\d.]+) tok/s")


def run_once(args: list[str]) -> dict[str, object]:
    proc = subprocess.run(["dflash", "run", *args], capture_output=True, text=True, check=True)
    m = TPS.search(proc.stderr)
    if not m:
        raise RuntimeError(f"no tok/s line in: {proc.stderr[-500:]}")
    return {"tokens": int(m[1]), "decode_tps": float(m[2]), "stderr_last": proc.stderr.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("run_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    run_args = [x for x in a.run_args if x != "--"]
    runs: dict[str, list[dict[str, object]]] = {"dflash": [], "no-draft": []}
    for _ in range(a.repeats):
        runs["dflash"].append(run_once(run_args))
        runs["no-draft"].append(run_once([*run_args, "--no-draft"]))
    med = {k: statistics.median(r["decode_tps"] for r in v) for k, v in runs.items()}
    table = Table(title=f"dflash run {shlex.join(run_args)}")
    for col in ("mode", "decode tok/s (each run)", "median", "ratio"):
        table.add_column(col)
    for k, v in runs.items():
        table.add_row(k, " ".join(f"{r['decode_tps']:.1f}" for r in v), f"{med[k]:.1f}",
                      f"{med[k] / med['no-draft']:.2f}x")
    Console().print(table)
    if a.json:
        doc = {"created": datetime.now(timezone.utc).isoformat(), "command": shlex.join([sys.argv[0], *sys.argv[1:]]),
               "machine": machine_info(), "git": git_commit(), "run_args": run_args, "runs": runs,
               "median_decode_tps": med, "ratio": med["dflash"] / med["no-draft"]}
        a.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
