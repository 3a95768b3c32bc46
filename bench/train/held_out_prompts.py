"""The prompts of a kept `dflash train` data set's held-out groups (trainer.held_out_groups: never trained on), as a
prompt file for tau.py or `dflash bench --prompts`: each sequence's prompt tokens as text (a chat template's control
tokens spelled out, so they tokenize back), raw completion. One
prompt per held-out group, groups spread over the set, so a few dozen prompts cover its kinds.

    python bench/train/held_out_prompts.py TARGET.gguf DATA_DIR N OUT.jsonl [--trained-on DIR ...]

DATA_DIR holds index.json.gz and tokens.i32.xz, as bench/train/data/* keeps them. --trained-on names the data sets of
the drafters a drafter started from (`--init`): a group they trained on is left out, since the drafter learned from it
too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
from pathlib import Path

import numpy as np

from dflash_local.target import Target, TargetParams
from dflash_local.train import trainer
from dflash_local.train.data import Sequence


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("--trained-on", type=Path, nargs="*", default=[])
    a = ap.parse_args()
    sequences = _sequences(a.data)
    tokens = np.frombuffer(lzma.open(a.data / "tokens.i32.xz").read(), dtype=np.int32)
    starts = np.cumsum([0] + [s.n_tokens for s in sequences])
    held = trainer.held_out_groups(sequences).difference(*(_trained(_sequences(d)) for d in a.trained_on))
    first = {}  # held-out group -> its first sequence's index
    for i, s in enumerate(sequences):
        if s.group in held:
            first.setdefault(s.group, i)
    picked = list(first.values())
    n = min(a.n, len(picked))
    picked = [picked[round(j * len(picked) / n)] for j in range(n)]
    tg = Target(a.target, TargetParams(n_ctx=64))
    try:
        rows = [{"id": sequences[i].group,
                 "prompt": tg.text(tokens[starts[i]:starts[i] + sequences[i].n_prompt].tolist(), special=True),
                 "chat": False} for i in picked]
    finally:
        tg.close()
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts of {len(held)} held-out groups -> {a.out}")


def _sequences(data: Path) -> list[Sequence]:
    return [Sequence(**s) for s in json.load(gzip.open(data / "index.json.gz"))["sequences"]]


def _trained(sequences: list[Sequence]) -> set[str]:
    return {s.group for s in sequences} - trainer.held_out_groups(sequences)


if __name__ == "__main__":
    main()
