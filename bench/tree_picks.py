"""What a tree step's verification costs, two ways side by side in one process: every row's logits to the host and the
walk's argmaxes there (the engine's way for trees before the branches shared sequence 0's greedy sampler), against
every row picked in the graph (`Target.pick_on_device`: one argmax for all rows, whichever sequence each is of). The
tree is the drafter's own for a code prompt (`build_tree` over `draft_top`, as `Engine._tree_step` builds it); each
repeat decodes the prompt afresh, then times the tree's pass and the walk down it; medians of --repeats after one
warm-up each.

    python -P bench/tree_picks.py TARGET DRAFTER [--tree-size 62] [--repeats 10] [--threads N] [--n-gpu-layers N]
        [--device CUDA0] [--json OUT.json]
"""

from __future__ import annotations

import llama_cpp as lc  # noqa: F401  first: numpy loaded before llama.cpp's libraries crashed its model load on GPUs

import json

import numpy as np

from dflash_local.bench.machine import script_header
from dflash_local.bench.timing import side_by_side_ms, side_by_side_parser
from dflash_local.native import Drafter
from dflash_local.sampling import SamplingParams
from dflash_local.target import Target, TargetParams
from dflash_local.tree import N_TOP, build_tree, walk

PROMPT = "def is_prime(n: int) -> bool:\n    \"\"\"Whether n is a prime number.\"\"\"\n"


def main() -> None:
    ap = side_by_side_parser()
    ap.add_argument("--tree-size", type=int, default=62, help="drafts of the tree (a pass of one more token)")
    a = ap.parse_args()
    params = TargetParams(n_ctx=256, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers)
    dr = Drafter(a.drafter, a.target, device=a.device, n_ctx=params.n_ctx, n_threads=a.threads)
    tg = Target(a.target, params, capture_layers=dr.info.target_layers, branches=a.tree_size)
    prompt = tg.tokenize(PROMPT, add_special=False)
    tg.decode(prompt[:-1], 0, all_logits=False)
    tg.inject_rows(dr, len(prompt) - 1, 0)
    ids, probs = dr.draft_top(prompt[-1], N_TOP, dr.info.block_size, dr.info.block_size - 1)
    tree = build_tree(ids, probs, a.tree_size)
    tokens, pos = [prompt[-1], *tree.tokens], len(prompt) - 1

    def verify(on_device: bool) -> list[int]:
        """The tree's pass and the walk from its root: the path's rows."""
        logits = tg.decode_tree(tokens, tree.depths, tree.seqs, pos)
        picks = tg.picks(len(tokens))
        assert (picks is not None) == on_device

        def pick(i: int) -> int:
            return int(picks[i]) if picks is not None else int(np.argmax(logits[i]))

        return walk(tree, pick)[0]

    def prepare(way: str) -> None:
        tg.pick_on_device(SamplingParams() if way == "device" else None)
        tg.clear()
        tg.decode(prompt[:-1], 0, all_logits=False)

    ms, medians, paths = side_by_side_ms({"host": lambda: verify(False), "device": lambda: verify(True)}, prepare,
                                         a.repeats)
    assert paths["host"] == paths["device"], paths
    print(f"{a.target.name} + {a.drafter.name}, a tree of {len(tree.tokens)} drafts, path {paths['device']}: "
          + ", ".join(f"{way} {m:.3f} ms" for way, m in medians.items()))
    if a.json:
        a.json.write_text(json.dumps(script_header("dflash-tree-picks/1") | {
            "drafts": len(tree.tokens), "path": paths["device"], "repeats": a.repeats, "ms": ms,
            "median_ms": medians}, indent=1))
    tg.close()
    dr.close()


if __name__ == "__main__":
    main()
