"""Held-out tau of a drafter on a `dflash train` data set, as the trainer measures it (greedy decoding of the first
trainer.WALK_TOKENS answer tokens, simulated on the stored answers: the same sequences), and by kind of prompt (a
sequence group's first path component: `self` for the target's own requests, `stdlib`, a package name...;
`ungrouped` for an index written before groups). The held-out sequences' features are
captured again here, so `index.json` and `tokens.i32` are enough: e.g. a data set brought back from a GPU.

    python bench/train/held_out.py TARGET.gguf DRAFTER.gguf DATA_DIR [--work DIR] [--threads N] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dflash_local.bench.machine import git_commit, machine_info
from dflash_local.convert.gguf_io import load_drafter_gguf
from dflash_local.target import Target, TargetParams
from dflash_local.train import answers, trainer
from dflash_local.train.data import Dataset, Sequence

PER_KIND = 48  # sequences, spread over the kind's


def kind(s: Sequence) -> str:
    return s.group.split("/", 1)[0] if "/" in s.group else "ungrouped"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("data", type=Path, help="a dflash train data folder (index.json and tokens.i32 suffice)")
    ap.add_argument("--work", type=Path, help="where the held-out sequences' features go (default: DATA-held-out)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    drafter = load_drafter_gguf(str(a.drafter), a.target).eval()
    layers, width = drafter.cfg.target_layers, drafter.cfg.n_embd
    src = Dataset(a.data, a.target, layers, width)
    usable = [s for s in src.sequences if trainer.trainable(s)]
    held = trainer.held_out_groups(src.sequences)
    work = Dataset(a.work or a.data.with_name(a.data.name + "-held-out"), a.target, layers, width)
    if not work.sequences:
        tokens = {s.key: t for s, t in zip(src.sequences, src.token_lists())}
        for s in usable:
            if s.group in held:
                work.append(s.key, s.group, tokens[s.key], s.n_prompt)
        work.save()
    tg = Target(a.target, TargetParams(n_ctx=max(s.n_tokens for s in work.sequences) + 1, n_threads=a.threads),
                capture_layers=layers)
    try:
        with Progress() as progress:
            answers.capture(tg, work, progress)
    finally:
        tg.close()

    tr = trainer.Trainer(drafter, work, trainer.TrainOptions(steps=1), torch.device("cpu"))
    tr.held_out = sorted(tr.seqs + tr.held_out)  # here every sequence is held out of the run that trained drafter
    rows = [{"kind": "all (the trainer's sequences)", "sequences": min(trainer.WALK_SEQS, len(tr.held_out)),
             "tau": tr.held_out_tau()}]
    first_row = dict(zip(work.arrays()[3].tolist(), work.sequences))
    by_kind: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)
    for seq in tr.held_out:
        by_kind[kind(first_row[seq[0]])].append(seq)
    for name, pool in sorted(by_kind.items()):
        rows.append({"kind": name, "sequences": min(PER_KIND, len(pool)), "tau": tr.held_out_tau(pool, PER_KIND)})

    table = Table(title=f"held-out tau of {a.drafter.name} (greedy decoding simulated on the stored answers, "
                        f"block {drafter.cfg.block_size}, first {trainer.WALK_TOKENS} tokens)")
    for col in ("kind", "sequences", "tau"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], str(r["sequences"]), f"{r['tau']:.2f}")
    Console().print(table)
    if a.json:
        a.json.write_text(json.dumps({"target": str(a.target), "drafter": str(a.drafter), "data": str(a.data),
                                      "machine": machine_info(), "commit": git_commit(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
