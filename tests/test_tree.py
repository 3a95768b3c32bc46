"""Trees of drafts (dflash_local/tree.py): their shape and the sequences that give each node its attention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dflash_local.draft_length import EXPLORE_SHARE, Choice, DraftLength, choices_for
from dflash_local.lookup import PRIOR, Lookup
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


@pytest.mark.parametrize("copied", [([], []), ([0, 5, 1000, 1001], [0.9, 0.5, 0.3, 0.3])])
def test_a_smaller_budget_is_the_first_nodes_of_a_bigger_tree(copied):
    """The draft-length policy reads what a tree of m drafts would have accepted off a bigger tree's ranks."""
    rng = np.random.default_rng(1)
    probs = np.sort(rng.dirichlet(np.ones(6), size=15)[:, :4], axis=1)[:, ::-1]
    ids = np.arange(15 * 4).reshape(15, 4)
    big = build_tree(ids, probs, 63, copied)

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
        assert paths(build_tree(ids, probs, m, copied), m) == paths(big, m)


def test_a_copied_chain_shares_the_drafters_nodes_and_competes_by_its_probability():
    ids = np.arange(15 * 4).reshape(15, 4)  # a token names its position and rank
    probs = np.tile([0.5, 0.3, 0.1, 0.1], (15, 1))
    copied = [0, 5, 1000, 1001, 1002]  # the drafter's first and second choices, then tokens it never drafts
    tree = build_tree(ids, probs, 15, (copied, [0.9] * 5))
    path, node = [], 0
    for token in copied:
        node = tree.children[node][token]
        path.append(node)
    assert [tree.ranks[i] for i in path] == [1, 2, 3, 4, 5], "0.9 a token: likelier than any drafted path"
    assert len(tree.children[0]) == len(set(tree.children[0])) and tree.children[path[0]][4] != path[1]
    assert len(tree.tokens) == 15 and sorted(tree.ranks) == list(range(16))
    unlikely = build_tree(ids, probs, 15, (copied, [0.01] * 5))
    assert 1000 not in unlikely.tokens, "a copy no likelier than the drafter's paths is left out"


def test_a_lookup_copies_what_followed_the_longest_suffix_where_it_occurred_last():
    lookup = Lookup()
    assert lookup.copy(4) == ([], [])
    lookup.extend([1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 2, 3])
    # the suffix 2 3 occurred at 1..2 (then 9) and at 5..6 (then 4 5 6 ...): the last, matched by 2 tokens
    assert lookup.copy(4) == ([4, 5, 6, 7], [PRIOR[1], PRIOR[2], PRIOR[3], PRIOR[4]])
    lookup.extend([8])
    assert lookup.copy(4) == ([], []), "8 occurred nowhere before"
    lookup.extend([9, 8, 9, 8])
    assert lookup.copy(5)[0] == [9, 8, 9, 8, 9], "a copy reaching the end goes on as the loop it copies"


def _costs(target_alone: float, per_draft: float, tree: float) -> dict[Choice, float]:
    """Step costs of every choice of a 16-block with trees of 62: chains grow with their drafts, trees cost `tree`."""
    return {c: tree if c.tree else target_alone + c.k * per_draft for c in choices_for(15, 62)}


def test_the_draft_length_policy_reads_smaller_choices_off_a_bigger_one():
    policy = DraftLength(_costs(1e-3, 1e-4, 2e-3), depth=15)
    policy.record(Choice(True, 62), [1, 2, 20], 0.03, tried=False)  # the accepted path's nodes, by rank
    assert {c.k: policy.gained[c] for c in policy.choices if c.tree} == {15: 2, 31: 3, 62: 3}
    assert not any(policy.seen[c] for c in policy.choices if not c.tree), "a tree says nothing of chains"
    policy.record(Choice(False, 7), [1, 2], 0.03, tried=False)
    assert {c.k: policy.gained[c] for c in policy.choices if not c.tree and c.k} == {1: 1, 3: 2, 7: 2, 15: 0}


def test_the_policy_tries_only_what_could_pay_and_within_its_share_of_the_time():
    # a CPU-like machine: a draft costs 3/4 of a one-token pass, trees 30 passes: no tree can ever pay (16 tokens at
    # most for 30 passes' time), chains could if most drafts were accepted
    policy = DraftLength(_costs(1e-3, 0.75e-3, 30e-3), depth=15)
    assert policy.choose(15, 62) == (Choice(False, 0), False), "nothing measured: the target alone, no try yet"
    steps = 0
    while not (chosen := policy.choose(15, 62))[1]:  # the target alone until the tries' share of time allows one
        policy.record(chosen[0], [], 1e-3, tried=False)
        steps += 1
    # a chain of 1 could make 2 tokens in 1.75 ms, 14 % more than the target alone: its try (1.75 ms) waits until it
    # fits in 14 % of the tries' share of the time so far
    could_win = 2 / 1.75 - 1
    assert steps == math.ceil(1.75e-3 / (EXPLORE_SHARE * could_win) / 1e-3), "a try needs its share of time"
    assert chosen[0] == Choice(False, 1)
    tries = set()
    for _ in range(5000):
        c, tried = policy.choose(15, 62)
        tries |= {c} if tried else set()
        policy.record(c, [], 1e-3 + c.k * 0.75e-3 if not c.tree else 30e-3, tried)  # nothing is ever accepted
    assert not any(c.tree for c in tries), "a tree cannot pay here whatever it accepts"
    assert policy.t_explore <= EXPLORE_SHARE * policy.t_total
    assert policy.choose(15, 62)[0] == Choice(False, 0)


def test_a_longer_chain_is_tried_only_if_a_shorter_ones_drafts_are_all_accepted_often_enough():
    policy = DraftLength(_costs(1e-3, 0.75e-3, 30e-3), depth=15)
    policy.t_total = 100.0  # time enough for any try

    def rate(k: int) -> float:  # the best a chain of k could do, in tokens per one-token pass
        return policy._hope(Choice(False, k)) * 1e-3

    assert rate(15) > 1, "nothing measured: a chain of 15 could pay if all its drafts were accepted"
    for _ in range(8):  # a chain of 3: its first draft accepted in 1 of 9 steps, never all 3
        policy.record(Choice(False, 3), [], 3.25e-3, tried=True)
    policy.record(Choice(False, 3), [1], 3.25e-3, tried=True)
    assert policy.whole[Choice(False, 1)] == 1 and policy.steps[Choice(False, 1)] == 9
    # a chain of 15 gains at most the chain of 3's 1/9 + 12 x (0 + 1 / sqrt(10)) drafts: 1 + 3.9 tokens for the time of
    # 12.25 one-token passes
    assert rate(15) < 1 and policy.choose(15, 0)[0] == Choice(False, 0)
    for _ in range(40):  # then all drafts of the chain of 3 accepted: in 40 of 49 steps
        policy.record(Choice(False, 3), [1, 2, 3], 3.25e-3, tried=True)
    assert rate(15) > 1, "now a long chain could pay again"


def test_a_generation_drafts_only_where_some_choice_could_pay():
    cpu = DraftLength(_costs(1e-3, 0.75e-3, 30e-3), depth=15)
    gpu = DraftLength(_costs(1e-3, 0.05e-3, 1.5e-3), depth=15)
    for policy in (cpu, gpu):
        assert policy.could_draft(15, 62), "nothing known: a chain could pay were all its drafts accepted"
        for _ in range(100):  # chains of 15 tried long, none of their drafts ever accepted
            policy.record(Choice(False, 15), [], policy.cost[Choice(False, 15)], tried=True)
    # each chain's hope is now k / sqrt(101) drafts: on the CPU none could pay (nor a tree, 30 passes' time for 16
    # tokens at most); on the GPU a chain of 1 still could (1.1 tokens for 1.05 passes' time)
    assert not cpu.could_draft(15, 62)
    assert gpu.could_draft(15, 0)


def test_a_tree_is_hoped_to_accept_no_more_than_a_bigger_one():
    # a CPU-like machine where a tree of 31 would pay only if it accepted nearly its whole depth
    costs = _costs(1e-3, 0.75e-3, 12e-3)
    assert DraftLength(costs, depth=15)._hope(Choice(True, 31)) > 1000, "nothing known: it could pay"
    # trees of 62 seen to accept 3 drafts in 32 steps: a tree of 31, whose drafts are the 31 first of theirs, at most
    # 3 + 12 / sqrt(33) = 5.1, 6.1 tokens in 12 passes' time
    policy = DraftLength(costs, depth=15, prior={Choice(True, 62): (32.0, 96.0)})
    assert policy._hope(Choice(True, 31)) == pytest.approx((1 + 3 + 12 / math.sqrt(33)) / 12e-3)
    assert not policy.could_draft(0, 62)


def test_the_policy_starts_from_what_earlier_runs_accepted():
    # a GPU-like machine: every pass costs about what one token does; an earlier run saw trees of 62 accept 6 drafts
    costs = _costs(1e-3, 0.05e-3, 1.5e-3)
    prior = {c: (100.0, 6.0 * 100 if c.tree else min(c.k, 4) * 100.0) for c in choices_for(15, 62) if c.k}
    policy = DraftLength(costs, depth=15, prior=prior)
    assert policy.choose(15, 62) == (Choice(True, 15), False), "the prior's best from the first step"
    assert policy.seen[Choice(True, 15)] == 32, "earlier runs weigh at most PRIOR_STEPS steps"
    assert policy.choose(15, 0) == (Choice(False, 7), False), "no room for a tree: the fastest chain"
