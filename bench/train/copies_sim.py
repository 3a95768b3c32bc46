"""Drafts copied from the context (dflash_local/lookup.py) beside the drafter's, simulated: the target's greedy text
and the drafter's top-4 drafts at every position of it are recorded once (greedy decoding makes both independent of
how a step drafts), then chains and trees are walked over them with and without copies, as the engine walks them
(`bench/train/tau.py` measures the engine itself; on the coder's first 40 HumanEval prompts, trees of 15 with copies,
this gave 5.292 and tau.py 5.293).

    python -P bench/train/copies_sim.py TARGET DRAFTER [--prompts humaneval] [-n 40] [--max-tokens 128]
        [--threads N] [--record F.pkl]

--record keeps the recording (and reads it where it exists).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from dflash_local.bench.prompts import load_prompts
from dflash_local.engine import Engine
from dflash_local.loader import open_models
from dflash_local.lookup import Lookup
from dflash_local.target import TargetParams
from dflash_local.train.evaluate import prompt_tokens
from dflash_local.tree import N_TOP, build_tree, walk

Recording = list[tuple[list[int], list[int], dict[int, tuple[np.ndarray, np.ndarray]]]]


def record(a: argparse.Namespace) -> Recording:
    """Per prompt: its tokens, the target's greedy text, and at each position of the text the drafter's top drafts
    (ids, probs) after it."""
    tg, dr = open_models(a.target, a.drafter, TargetParams(n_ctx=4096, n_threads=a.threads), None, 0)
    block = dr.info.block_size
    out: Recording = []
    for p in track(load_prompts(a.prompts, a.n), description="recording"):
        ids = prompt_tokens(tg, p)
        text = Engine(tg).generate(ids, a.max_tokens).tokens
        seq = ids + text
        tg.clear()
        dr.crop(0)
        tg.decode(seq, 0, all_logits=False)
        tg.inject_rows(dr, len(seq), 0)
        drafts = {}
        for pos in range(len(seq) - 1, len(ids) - 1, -1):  # the drafter's context cut back to each position in turn
            dr.crop(pos)
            drafts[pos] = dr.draft_top(seq[pos], N_TOP, block, block - 1)
        out.append((ids, text, drafts))
    dr.close()
    tg.close()
    return out


def tau(rec: Recording, tree_size: int, copies: bool, max_tokens: int) -> float:
    """Mean over prompts of tokens per pass, each pass a tree of tree_size drafts (0: a chain of the drafter's first
    choices, or a copy that matched a whole suffix, as Engine._step drafts)."""
    taus = []
    for ids, text, drafts in rec:
        n = len(ids)
        seq = ids + text + [-1] * 16  # past the text: no draft is right
        lookup = Lookup()
        lookup.extend(ids + text[:1])
        pos, accepted = n, []
        while pos in drafts and (depth := min(len(drafts[pos][0]), max_tokens - (pos - n) - 2)) > 0:
            top, probs = drafts[pos][0][:depth], drafts[pos][1][:depth]
            if tree_size:
                tree = build_tree(top, probs, tree_size, lookup.copy(depth) if copies else ([], []))
                path, _ = walk(tree, lambda i: seq[pos + tree.depths[i] + 1])
                a = len(path) - 1
            else:
                chain = (lookup.sure_copy(depth) if copies else []) or top[:, 0].tolist()
                a = next((j for j, t in enumerate(chain) if seq[pos + 1 + j] != t), len(chain))
            accepted.append(a)
            lookup.extend(seq[pos + 1:pos + a + 2])
            pos += a + 1
        if accepted:
            taus.append(np.mean(accepted) + 1)
    return float(np.mean(taus))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("drafter", type=Path)
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--record", type=Path)
    a = ap.parse_args()
    if a.record and a.record.exists():
        rec = pickle.loads(a.record.read_bytes())
    else:
        rec = record(a)
        if a.record:
            a.record.write_bytes(pickle.dumps(rec))
    table = Table(title=f"simulated tau, {len(rec)} prompts of {a.prompts}, {a.max_tokens} tokens")
    for col in ("drafts", "the drafter's", "with copies"):
        table.add_column(col)
    for size in (0, 15, 62):
        table.add_row(f"tree of {size}" if size else "chain",
                      *(f"{tau(rec, size, copies, a.max_tokens):.3f}" for copies in (False, True)))
    Console().print(table)


if __name__ == "__main__":
    main()
