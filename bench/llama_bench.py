"""llama.cpp's own cost of a pass of k tokens against a pass of one (issue 24), with no line of dflash-local in the
passes: upstream's llama-bench, built by bench/build_llama_cpp.sh from the llama.cpp vendored in the pinned
llama-cpp-python (so the same kernels as the engine's target), run on MODEL at --depth positions of context.

- `pp k`: one llama_decode of k tokens after the depth's tokens (llama-bench computes the logits of the last row only;
  a verification computes every row's, so its pass costs a little more than this);
- `tg`: one-token passes, --gen of them in a row (CUDA graphs warm), the cost of one.

Each cost is the median of llama-bench's repeats (its first two pp repeats ran 1.5-3x slower on an H100, which
llama-bench's own means keep). Prints each pass's ms, its ratio to one token (tg) and writes them with llama-bench's
own rows as JSON.

    python bench/llama_bench.py LLAMA_BENCH MODEL [--sizes 1,2,4,8,16] [--depth 512] [--gen 32] [--repeats 20]
        [--n-gpu-layers 99] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dflash_local.bench.machine import file_info, script_header
from dflash_local.bench.report import write_json


def run_llama_bench(exe: Path, model: Path, sizes: list[int], depth: int, gen: int, repeats: int,
                    ngl: int) -> tuple[list[str], list[dict]]:
    """llama-bench's command and its JSON rows (one per test)."""
    cmd = [str(exe), "-m", str(model), "-ngl", str(ngl), "-p", ",".join(map(str, sizes)), "-n", str(gen),
           "-d", str(depth), "-r", str(repeats), "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return cmd, json.loads(out)


def median_ms(row: dict) -> float:
    """A test's median repeat in ms, per pass (a tg repeat is n_gen passes)."""
    return statistics.median(row["samples_ns"]) / 1e6 / max(row["n_gen"], 1)


def pass_costs(rows: list[dict]) -> tuple[float, list[dict]]:
    """The ms of one token (tg) and of each pp pass, with its ratio to one token."""
    one = median_ms(next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0))
    passes = [{"tokens": r["n_prompt"], "ms": (ms := median_ms(r)), "vs_one_token": ms / one}
              for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0]
    return one, passes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("llama_bench", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--sizes", default="1,2,4,8,16")
    for flag, default in (("--depth", 512), ("--gen", 32), ("--repeats", 20), ("--n-gpu-layers", 99)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cmd, rows = run_llama_bench(a.llama_bench, a.model, [int(s) for s in a.sizes.split(",")], a.depth, a.gen,
                                a.repeats, a.n_gpu_layers)
    one, passes = pass_costs(rows)
    table = Table(title=f"llama-bench, {a.model.name}, {a.depth} positions of context, medians of {a.repeats}")
    for col in ("pass", "ms", "x one token"):
        table.add_column(col, justify="right")
    table.add_row("1 token (tg)", f"{one:.3f}", "1.00")
    for p in passes:
        table.add_row(f"{p['tokens']} tokens (pp)", f"{p['ms']:.3f}", f"{p['vs_one_token']:.2f}")
    Console().print(table)
    if a.json:
        write_json({**script_header("llama-bench-pass-costs/1"), "model": file_info(a.model),
                    "llama_bench_command": cmd, "one_token_ms": one, "passes": passes, "llama_bench_rows": rows},
                   a.json)


if __name__ == "__main__":
    main()
