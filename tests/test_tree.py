"""Trees of drafts (dflash_local/tree.py): their shape and the sequences that give each node its attention."""

from __future__ import annotations

import numpy as np

from dflash_local.tree import build_tree


def test_a_tree_keeps_the_likeliest_paths_in_batch_order():
    rng = np.random.default_rng(0)
    probs = np.sort(rng.dirichlet(np.ones(8), size=15)[:, :4], axis=1)[:, ::-1]
    ids = np.arange(15 * 4).reshape(15, 4)  # distinct tokens: a token names its position and rank
    tree = build_tree(ids, probs, 15)
    n = len(tree.tokens) + 1
    assert n == 16
    for i in range(1, n):
        parent = tree.parents[i - 1]
        assert parent < i and tree.depths[i] == tree.depths[parent] + 1
        assert tree.tokens[i - 1] // 4 == tree.depths[i] - 1  # the token of its depth's position
        assert tree.children[parent][tree.tokens[i - 1]] == i
        assert set(tree.seqs[i]) <= set(tree.seqs[parent]) and tree.seqs[i][0] == min(tree.seqs[i])
    leaves = [i for i in range(n) if not tree.children[i]]
    assert tree.seqs[0] == tuple(range(len(leaves)))
    # the likeliest chain comes first, in the batch's first cells
    first = [i for i in range(1, n) if tree.tokens[i - 1] % 4 == 0 and tree.depths[i] == i]
    assert first == list(range(1, len(first) + 1)) and len(first) >= 2


def test_one_choice_per_position_is_a_chain():
    ids = np.arange(15)[:, None]
    tree = build_tree(ids, np.full((15, 1), 0.5), 6)
    assert tree.tokens == list(range(6)) and tree.depths == list(range(7))
    assert tree.seqs == [(0,)] * 7
