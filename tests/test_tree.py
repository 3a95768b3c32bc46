"""Trees of drafts (dflash_local/tree.py): their shape and the sequences that give each node its attention."""

from __future__ import annotations

import numpy as np

from dflash_local.draft_length import Choice, DraftLength
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


def test_a_smaller_budget_is_the_first_nodes_of_a_bigger_tree():
    """The draft-length policy reads what a tree of m drafts would have accepted off a bigger tree's ranks."""
    rng = np.random.default_rng(1)
    probs = np.sort(rng.dirichlet(np.ones(6), size=15)[:, :4], axis=1)[:, ::-1]
    ids = np.arange(15 * 4).reshape(15, 4)
    big = build_tree(ids, probs, 63)

    def paths(tree, max_rank):
        out = set()
        for i in range(1, len(tree.tokens) + 1):
            if tree.ranks[i] <= max_rank:
                path, j = [], i
                while j:
                    path.append(tree.tokens[j - 1])
                    j = tree.parents[j - 1]
                out.add(tuple(path[::-1]))
        return out

    assert sorted(big.ranks) == list(range(64))
    for m in (1, 3, 7, 15, 31):
        assert paths(build_tree(ids, probs, m), m) == paths(big, m)


def test_the_draft_length_policy_reads_smaller_choices_off_a_bigger_one():
    policy = DraftLength(15, 62)
    policy.record(Choice(True, 62), [1, 2, 20], t_draft=0.01, t_target=0.02)  # the accepted path's nodes, by rank
    assert {c.k: policy.gained[c] for c in policy.choices if c.tree} == {15: 2, 31: 3, 62: 3}
    assert not any(policy.seen[c] for c in policy.choices if not c.tree), "a tree says nothing of chains"
    policy.record(Choice(False, 7), [1, 2], t_draft=0.01, t_target=0.02)
    assert {c.k: policy.gained[c] for c in policy.choices if not c.tree and c.k} == {1: 1, 3: 2, 7: 2, 15: 0}
    # every choice is tried once, then the fastest by measured gain and cost is kept: here trees cost what one token
    # does and chains grow with their drafts; all accept 4 drafts where they can
    policy = DraftLength(15, 62)
    tried = set()
    for _ in range(len(policy.choices)):
        c = policy.choose(15, 62)
        tried.add(c)
        policy.record(c, list(range(1, min(c.k, 4) + 1)), t_draft=1e-4, t_target=1e-3 * (1 if c.tree else 1 + c.k / 4))
    assert tried == set(policy.choices)
    assert policy.choose(15, 62) == Choice(True, 15)
    assert policy.choose(15, 0) == Choice(False, 3), "no room for a tree: the fastest chain"
