"""A tree of drafts from one DFlash pass: the drafter gives each block position's likeliest tokens (marginals, not
conditioned on each other), so the most likely paths by the product of their tokens' probabilities branch where
the drafter is unsure. The target verifies the whole tree in one pass."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

# No numpy here: the command line reads TREE_SIZE, and numpy loaded before llama_cpp crashed llama.cpp's CUDA model
# load (an H200 machine, numpy 2). The most drafts of a tree: a pass of 63 tokens, whose compute on a GPU costs about
# what 16 tokens' does. From 64 on, ggml's CPU flash attention takes its tiled path (GGML_FA_TILE_Q), which rounds
# differently from the target's one-token passes.
TREE_SIZE = 62
N_TOP = 4  # tokens per draft position a tree may branch into (8 drafted about as well at 15 nodes)
COPIED = -1  # the rank of a copied token (build_tree's candidates)


@dataclass
class DraftTree:
    tokens: list[int]  # node i + 1 of the verification batch; node 0 is the anchor
    parents: list[int]  # batch index of each node's parent
    depths: list[int]  # batch index -> depth (the anchor 0)
    children: list[dict[int, int]]  # batch index -> {token: batch index of that child}
    seqs: list[tuple[int, ...]]  # batch index -> the sequences (one per leaf) of the leaves below it, first its own
    ranks: list[int]  # batch index -> the order in which it was chosen (anchor 0): a budget of m keeps ranks <= m


def build_tree(ids: np.ndarray, probs: np.ndarray, budget: int, copied: tuple[list[int], list[float]] = ([], [])
               ) -> DraftTree:
    """The `budget` likeliest paths' nodes, best first: ids and probs [positions, n_top] likeliest first. A node's
    candidates are its next sibling (the next likeliest token of its position) and its first child, so nodes come
    after their parents, and the tree of a smaller budget is the first nodes of this one (ranks).

    copied: a chain of tokens from the first position on and the probability of each (lookup.Lookup.copy), a
    candidate path of its own; where it drafts a node the drafter's candidates draft too, they share it."""
    logp = [[math.log(max(p, 1e-30)) for p in row] for row in probs.tolist()]
    tops = ids.tolist()
    max_depth = min(len(tops), budget)
    copy, copy_logp = copied[0][:max_depth], [math.log(p) for p in copied[1][:max_depth]]
    tokens: list[int] = []
    parents: list[int] = []
    depths = [0]
    made: dict[tuple[int, int], int] = {}  # (parent, token) -> batch index
    # (-score, parent batch index, depth - 1, rank of the drafter's token or COPIED)
    heap = [(-logp[0][0], 0, 0, 0)] + ([(-copy_logp[0], 0, 0, COPIED)] if copy else [])
    while heap and len(tokens) < budget:
        neg, parent, d, rank = heapq.heappop(heap)
        token = copy[d] if rank == COPIED else tops[d][rank]
        node = made.get((parent, token))
        if node is None:  # else a path of the other kind drafted it already: the two go on from there
            tokens.append(token)
            parents.append(parent)
            depths.append(d + 1)
            node = made[parent, token] = len(tokens)
        if rank == COPIED:
            if d + 1 < len(copy):
                heapq.heappush(heap, (neg - copy_logp[d + 1], node, d + 1, COPIED))
            continue
        if rank + 1 < len(tops[d]):
            heapq.heappush(heap, (neg + logp[d][rank] - logp[d][rank + 1], parent, d, rank + 1))
        if d + 1 < max_depth:
            heapq.heappush(heap, (neg - logp[d + 1][0], node, d + 1, 0))
    # depth first, likeliest child first: the likeliest chain takes the batch's first cells, so that a path along it
    # keeps cells in the order of its positions (Target.keep_branch)
    kids: list[list[int]] = [[] for _ in range(len(tokens) + 1)]
    for i, parent in enumerate(parents, start=1):
        kids[parent].append(i)
    order, stack = [], kids[0][::-1]
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(kids[i][::-1])
    new_index = {old: new for new, old in enumerate(order, start=1)} | {0: 0}
    ranks = [0, *order]  # old index = order chosen
    tokens = [tokens[i - 1] for i in order]
    parents = [new_index[parents[i - 1]] for i in order]
    depths = [0] + [depths[i] for i in order]
    n = len(tokens) + 1
    children: list[dict[int, int]] = [{} for _ in range(n)]
    for i, (tok, parent) in enumerate(zip(tokens, parents), start=1):
        children[parent][tok] = i
    leaves = [i for i in range(n) if not children[i]]
    below: list[list[int]] = [[] for _ in range(n)]
    for seq, leaf in enumerate(leaves):
        below[leaf].append(seq)
    for i in range(n - 1, 0, -1):  # parents come first, so children's sets are complete here
        below[parents[i - 1]].extend(below[i])
    return DraftTree(tokens, parents, depths, children, [tuple(sorted(b)) for b in below], ranks)


def walk(tree: DraftTree, pick: Callable[[int], int]) -> tuple[list[int], int]:
    """From the root, the child drafting the target's own token at each node (pick(i): its token after batch index i),
    until no child does: the path's batch indices, the root first, and the target's token after the last."""
    path = [0]
    token = pick(0)
    while token in tree.children[path[-1]]:
        path.append(tree.children[path[-1]][token])
        token = pick(path[-1])
    return path, token
