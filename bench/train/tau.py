"""Acceptance length tau of drafters (greedy, every pass drafts the whole block, as `dflash train` evaluates):
DFlash alone, without `dflash bench`'s target-alone runs, so a CPU measures the 164 HumanEval prompts in
minutes. Prints a table and writes the rows as JSON.

    python bench/train/tau.py TARGET.gguf NAME=DRAFTER.gguf:SET:N [...] [--max-tokens 128] [--threads N]
        [--tree-size K] [--json F]

--tree-size K verifies K drafts a pass as a tree (default 15: a pass of 16 tokens, as a block of 16 takes); 0 as one
chain of a block's drafts.

SET is humaneval, chat or a prompt file (as `dflash bench --prompts`); N the number of its first prompts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dflash_local.bench.machine import git_commit, machine_info
from dflash_local.bench.prompts import load_prompts
from dflash_local.target import TargetParams
from dflash_local.train.evaluate import measure_tau


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("runs", nargs="+", help="NAME=DRAFTER.gguf:SET:N")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tree-size", type=int, default=15, help="drafts of a tree a pass; 0: one chain")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    params = TargetParams(n_ctx=4096, n_threads=a.threads)
    rows = []
    with Progress() as progress:
        for run in a.runs:
            name, spec = run.split("=", 1)
            drafter, prompt_set, n = spec.rsplit(":", 2)
            ev = measure_tau(a.target, Path(drafter), load_prompts(prompt_set, int(n)), a.max_tokens, params, None,
                             progress, a.tree_size)
            rows.append({"name": name, "drafter": drafter, "set": prompt_set, **asdict(ev)})
    drafts = f"tree of {a.tree_size}" if a.tree_size else "chain"
    table = Table(title=f"tau, block 16 ({drafts}), greedy, {a.max_tokens} tokens per prompt")
    for col in ("drafter", "prompts", "n", "tau", "DFlash tok/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["set"], str(r["prompts"]), f"{r['tau']:.2f}", f"{r['tokens'] / r['seconds']:.1f}")
    Console().print(table)
    if a.json:
        a.json.write_text(json.dumps({"target": str(a.target), "max_tokens": a.max_tokens, "threads": a.threads,
                                      "drafts": drafts,
                                      "machine": machine_info(), "commit": git_commit(), "rows": rows}, indent=1))

if __name__ == "__main__":
    main()
