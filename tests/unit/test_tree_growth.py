"""Tree growth policy (pure): budget, depth, best-first order, parents before children."""

import math

import torch

from specedge.engine.tree import TreeGrowth, TreeParams

V = 6


def logprobs(values: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(values + [1e-9] * (V - len(values))))


def test_best_first_respects_budget_depth_and_order():
    growth = TreeGrowth(TreeParams(budget=5, depth=2, branch=2, beams=3))
    growth.offer(-1, logprobs([0.6, 0.3, 0.1]))
    first = growth.take()
    assert [growth.tree.tokens[i] for i in first] == [0, 1]  # only `branch` candidates per node
    for node in first:
        growth.offer(node, logprobs([0.9, 0.1]))
    second = growth.take()
    scores = [growth.tree.scores[i] for i in second]
    assert scores == sorted(scores, reverse=True) and len(second) == 3  # beams per pass
    for node in second:
        growth.offer(node, logprobs([0.5, 0.5]))  # depth 2 reached: no more candidates
    assert growth.take() == []
    tree = growth.result()
    assert len(tree) == 5
    assert all(p < i for i, p in enumerate(tree.parents))
    assert max(tree.depths()) <= 2
    assert tree.scores[0] == max(tree.scores)
    # the best path: root -> 0 (0.6) -> 0 (0.9)
    assert tree.likely_path() == [0, 2] and math.isclose(tree.scores[2], math.log(0.6 * 0.9), rel_tol=1e-6)


def test_kept_nodes_are_the_best_by_score_and_ancestor_closed():
    growth = TreeGrowth(TreeParams(budget=4, depth=3, branch=3, beams=8))
    growth.offer(-1, logprobs([0.5, 0.3, 0.2]))
    for node in growth.take():
        growth.offer(node, logprobs([0.7, 0.2, 0.1]))
    growth.take()
    tree = growth.result()
    assert len(tree) == 4
    kept = set(range(len(tree)))
    assert all(p == -1 or p in kept for p in tree.parents)
    everything = sorted(growth.tree.scores, reverse=True)[:4]
    assert sorted(tree.scores, reverse=True) == everything


def test_zero_budget_gives_an_empty_tree():
    growth = TreeGrowth(TreeParams(budget=0))
    growth.offer(-1, logprobs([0.4, 0.6]))
    assert growth.take() == [] and len(growth.result()) == 0
    assert growth.result().guess_next_root() == ([], 1)
