"""Static (calibrated) and dynamic (cumulative log-prob) tree builders for head drafters."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from device_client.tree_builders import (
    dynamic_tree,
    expected_accepted,
    measure_acceptance,
    merge_trees,
    node_paths,
    static_topology,
    tree_from_topology,
)
from shared.tree import TokenTree


def _acc(K=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    a = np.sort(rng.uniform(0.02, 0.8, size=(K, k)), axis=1)[:, ::-1]
    return a * np.linspace(1.0, 0.5, K)[:, None]


def _all_paths(K, k):
    for d in range(1, K + 1):
        yield from itertools.product(range(k), repeat=d)


def _brute_best(acc, n):
    """Best closed (parent-included) node set of size n by exhaustive search on a tiny case."""
    K, k = acc.shape
    paths = list(_all_paths(K, k))
    best = 0.0
    for combo in itertools.combinations(paths, n):
        s = set(combo)
        if all(len(p) == 1 or p[:-1] in s for p in combo):
            best = max(best, expected_accepted(list(combo), acc))
    return best


@pytest.mark.parametrize("n", [1, 3, 5])
def test_static_topology_is_optimal_on_small_cases(n):
    acc = _acc(K=2, k=3)
    topo = static_topology(acc, n + 1)
    assert len(topo) == n
    assert expected_accepted(topo, acc) == pytest.approx(_brute_best(acc, n))


def test_static_topology_parents_first_and_budget():
    acc = _acc(K=4, k=10)
    topo = static_topology(acc, 64)
    assert len(topo) == 63
    seen = set()
    for p in topo:
        assert len(p) == 1 or p[:-1] in seen
        seen.add(p)
    # bigger budgets never lower the expected length
    assert expected_accepted(static_topology(acc, 32), acc) <= expected_accepted(topo, acc)


def test_static_topology_handles_non_monotone_ranks():
    acc = np.array([[0.1, 0.5, 0.0], [0.3, 0.2, 0.1]])
    topo = static_topology(acc, 3)
    assert topo[0] == (1,)  # rank 1 is the better candidate at depth 1


def test_tree_from_topology_uses_round_candidates():
    ids = np.array([[10, 11, 12], [20, 21, 22], [30, 31, 32]])
    topo = [(0,), (1,), (0, 0), (0, 1), (0, 0, 2)]
    tree = tree_from_topology(7, topo, ids)
    assert tree.tokens == (7, 10, 11, 20, 21, 32)
    assert tree.parents == (-1, 0, 0, 1, 1, 3)
    tree.check_unique_siblings()
    assert len(tree_from_topology(7, topo, ids, budget=3)) == 3


def test_dynamic_tree_is_best_first_by_cumulative_logprob():
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    lp = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))
    tree = dynamic_tree(0, ids, lp, budget=5)
    # scores: 1:.7, 1-4:.42, 2:.2, 1-5:.21 -> {1, 4 under 1, 5 under 1, 2}
    assert len(tree) == 5
    got = {tuple(p) for p in node_paths(tree)}
    assert got == {(1,), (1, 4), (1, 5), (2,)}
    tree.check_unique_siblings()
    assert dynamic_tree(0, ids, lp, budget=1) == TokenTree.root_only(0)


def test_dynamic_tree_respects_budget_and_depth():
    rng = np.random.default_rng(1)
    K, k = 4, 10
    ids = np.stack([rng.permutation(1000)[:k] for _ in range(K)])
    lp = np.sort(np.log(rng.dirichlet(np.ones(50), size=K)[:, :k]), axis=1)[:, ::-1]
    for budget in (2, 16, 64):
        tree = dynamic_tree(5, ids, lp, budget)
        assert len(tree) == budget
        tree.check_unique_siblings()
    assert dynamic_tree(5, ids, lp, 64, max_depth=2).max_depth <= 2


def test_merge_trees_puts_ngram_paths_first_and_keeps_budget():
    head = dynamic_tree(9, np.array([[1, 2], [3, 4]]), np.log(np.array([[0.6, 0.3], [0.5, 0.4]])), 5)
    merged = merge_trees(9, [[1, 8, 8], [7]], head, budget=6)
    assert len(merged) == 6
    paths = {tuple(p) for p in node_paths(merged)}
    assert {(1,), (1, 8), (1, 8, 8), (7,)} <= paths
    merged.check_unique_siblings()
    # node_paths round-trips a tree
    from shared.tree import merge_paths

    again = merge_paths(9, node_paths(head), len(head))
    assert again == head


def test_measure_acceptance():
    ids = np.array([[[1, 2], [3, 4]], [[2, 1], [4, 3]]])
    labels = np.array([[1, 4], [1, -1]])
    acc = measure_acceptance(ids, labels)
    assert acc.tolist() == [[0.5, 0.5], [0.0, 1.0]]
