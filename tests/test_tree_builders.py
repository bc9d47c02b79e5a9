"""Static (calibrated) and dynamic (cumulative log-prob) tree builders for head drafters."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from device_client.drafters.ngram import NgramIndex
from device_client.tree_builders import (
    AcceptanceModel,
    TreeFeatures,
    dynamic_tree,
    expected_accepted,
    measure_acceptance,
    merge_trees,
    node_paths,
    static_topology,
    tree_from_topology,
    unified_tree,
    within_depth,
)
from shared.tree import TokenTree, node_price


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


def _model(K=3, head_slope=1.0, ngram_logit=3.0, bias=0.0):
    """A hand-made acceptance model: logit falls with the head's log-prob bin, an ngram
    continuation adds `ngram_logit` (any n, any kind); no copy effect."""
    f = TreeFeatures(num_heads=K)
    nb = len(f.lp_edges) + 1
    head = [head_slope * (2.0 - b) for _ in range(K) for b in range(nb)] + [-1.0] * (K + 1)
    ngram = [ngram_logit] * (f.sizes[1] - 1) + [0.0]
    return AcceptanceModel(f, tuple(head), tuple(ngram), (0.0,) * f.sizes[2], bias)


def _heads(K=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(np.arange(100, 200))[:k] for _ in range(K)])
    lps = np.sort(np.log(rng.dirichlet(np.ones(20), size=K)[:, :k]), axis=1)[:, ::-1]
    return ids, lps


def _children(model, depth, ids, lps, ngram, copy_rate):
    """The model's definition through `encode`, as calibration sees it: what the builder's fast
    scorer must agree with."""
    h, n, c, b = model.head, model.ngram, model.copy, model.bias
    feats = model.features.encode(depth, ids, lps, ngram, copy_rate)
    return sorted(((1.0 / (1.0 + math.exp(-(b + h[fh] + n[fn] + c[fc]))), t) for t, (fh, fn, fc) in feats.items()),
                  reverse=True)


def _path_probs(tree, model, context, ids, lps, index):
    """P(path) of each node and of every candidate child left out, recomputed from scratch."""
    paths = [[]] + node_paths(tree)
    probs = [1.0]
    for i in range(1, len(tree)):
        p = tree.parents[i]
        kids = dict((t, q) for q, t in _children(model, len(paths[p]), ids, lps, _ng(index, context, paths[p]),
                                                 index.copy_rate() if index else 0.0))
        probs.append(probs[p] * kids[tree.tokens[i]])
    left_out = []
    for i in range(len(tree)):
        used = {tree.tokens[c] for c in tree.children()[i]}
        for q, t in _children(model, len(paths[i]), ids, lps, _ng(index, context, paths[i]),
                              index.copy_rate() if index else 0.0):
            if t not in used:
                left_out.append(probs[i] * q)
    return probs, left_out


def _ng(index, context, path):
    return index.candidates((list(context) + path)[-index.max_n:]) if index else {}


@pytest.mark.parametrize("budget", [1, 2, 8, 33])
def test_unified_tree_is_the_budgets_best_node_set(budget):
    ids, lps = _heads()
    context = [7, 100, 3, 8, 7, 101, 3, 8, 7]
    model = _model()
    index = NgramIndex(model.features.max_n)
    tree = unified_tree(context, ids, lps, budget, model, index)
    assert len(tree) == budget and tree.tokens[0] == 7
    tree.check_unique_siblings()  # TokenTree itself checks parents come first
    probs, left_out = _path_probs(tree, model, context, ids, lps, index)
    # best-first: no left-out child would beat a node in the tree, and P(path) never grows downwards
    assert max(left_out) <= min(probs[1:], default=1.0) + 1e-12
    assert all(probs[i] <= probs[tree.parents[i]] for i in range(1, len(tree)))


@pytest.mark.parametrize("prices, nodes", [([], 12), ([0.3], 9), ([0.45], 5), ([0.6], 3), ([1.0], 1),
                                           # cheap small trees, dear large ones: the cheap nodes stay
                                           ([0.3, 0.3, 0.6], 4), ([0.0, 0.0, 0.0, 0.6], 8),
                                           ([0.8, 0.0], 1)])  # the first node below its price ends the tree
def test_unified_tree_stops_at_the_first_node_below_the_servers_price(prices, nodes):
    ids, lps = _heads()
    context = [7, 100, 3, 8, 7, 101, 3, 8, 7]
    model = _model(bias=5.0)  # paths' chances from 0.73 down to 0.27
    full = unified_tree(context, ids, lps, 12, model)
    tree = unified_tree(context, ids, lps, 12, model, None, prices)
    probs, _ = _path_probs(full, model, context, ids, lps, None)
    kept = list(itertools.takewhile(lambda i: probs[i] >= node_price(prices, i + 1), range(1, len(full))))
    kept = [0] + kept  # best-first: a prefix of the full tree
    assert len(kept) == len(tree) == nodes
    assert tree.tokens == tuple(full.tokens[i] for i in kept) and tree.parents == full.parents[:len(kept)]


def test_unified_tree_follows_a_long_lookup_past_the_heads():
    ids, lps = _heads(K=3)
    quote = list(range(500, 520))
    context = [1, 2] + quote + [3, 4] + quote[:5]  # the answer is quoting: copy the rest
    tree = unified_tree(context, ids, lps, 24, _model(), NgramIndex(8))
    paths = {tuple(p) for p in node_paths(tree)}
    assert tuple(quote[5:15]) in paths  # ten tokens deep, far below the three heads


def test_unified_tree_trusts_a_token_both_sources_propose():
    ids = np.array([[10, 11, 12], [20, 21, 22]])
    lps = np.log(np.array([[0.5, 0.2, 0.1], [0.5, 0.2, 0.1]]))
    context = [5, 11, 6, 5]  # after 5 came 11: the lookup agrees with the head's rank 1
    tree = unified_tree(context, ids, lps, 2, _model(K=2), NgramIndex(4))
    assert tree.tokens == (5, 11)
    # without the lookup the head's rank 0 wins
    assert unified_tree(context, ids, lps, 2, _model(K=2), None).tokens == (5, 10)


def test_acceptance_model_round_trips_and_checks_sizes():
    m = _model()
    again = AcceptanceModel.from_json(m.to_json())
    assert again.features == m.features and again.head == pytest.approx(m.head, abs=1e-4)
    with pytest.raises(ValueError, match="sizes"):
        AcceptanceModel(m.features, m.head[:-1], m.ngram, m.copy, 0.0)
    with pytest.raises(ValueError, match="format"):
        AcceptanceModel.from_json({**m.to_json(), "format": 99})


def test_lp_bins_and_features():
    f = TreeFeatures(num_heads=2)
    assert [f.lp_bin(x) for x in (-0.01, -0.1, -0.2, -5.0, -50.0)] == [0, 0, 1, 8, 9]
    ids, lps = np.array([[1, 2], [3, 4]]), np.log(np.array([[0.95, 0.01], [0.5, 0.1]]))
    feats = f.encode(0, ids, lps, {2: (3, 0), 9: (8, 3)}, copy_rate=1.0)
    nb, (hs, ns, cs) = len(f.lp_edges) + 1, f.sizes
    assert feats[1] == (0, ns - 1, 0)  # head only
    assert feats[2] == (f.lp_bin(np.log(0.01)), 2 * 4 + 0, cs - 1)  # head and a 3-gram
    assert feats[9] == (2 * nb + 0, 7 * 4 + 3, cs - 1)  # lookup only: "not proposed by head 0"
    assert f.encode(2, ids, lps, {5: (1, 0)}, 0.0) == {5: (hs - 1, 0, 1)}  # below the heads


def test_within_depth_cuts_deep_nodes_keeping_order():
    tree = TokenTree((9, 1, 2, 3, 4, 5), (-1, 0, 1, 0, 2, 3))
    cut = within_depth(tree, 1)
    assert cut.tokens == (9, 1, 3) and cut.parents == (-1, 0, 0)
    assert within_depth(tree, 5) is tree
    assert within_depth(tree, 0) == TokenTree.root_only(9)
