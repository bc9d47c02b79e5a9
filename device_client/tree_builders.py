"""Token-tree builders for head drafters (pure numpy; no torch on the device).

Inputs are the heads' per-round candidates: `ids[k, r]` and `logprobs[k, r]` for head k
(depth k+1 below the root) and rank r (sorted best first). The root (node 0) is the server's
bonus token; head k's candidates sit at depth k+1.

- Static trees (Medusa / Sequoia style): a calibration set gives `acc[d, r]`, the probability
  that head d's rank-r candidate is the target's token. Under the usual independence
  assumption a node reached by ranks (r_1..r_d) is accepted with prod_i acc[i, r_i], and the
  expected accepted length of a tree is the sum of that over its nodes. Since the probability
  never grows along a path, taking nodes best-first from a heap yields the node set that
  maximises the expected accepted length for the node budget (every parent comes first).
- Dynamic trees (SpecExec / EAGLE-2 style): the same best-first construction per round, scored
  by the heads' own cumulative log-probability.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from shared.tree import TokenTree, merge_paths

Topology = list[tuple[int, ...]]  # rank paths, parents before children


def _best_first(score: np.ndarray, n_nodes: int) -> list[tuple[tuple[int, ...], float]]:
    """Best-first node selection over rank paths with log-scores `score[d, r]` (<= 0 each).

    Returns up to `n_nodes` (path, cumulative score) pairs, each parent before its children.
    Children of a node at depth d are only tried in rank order, so the heap stays small.
    """
    depth, width = score.shape
    out: list[tuple[tuple[int, ...], float]] = []
    if n_nodes <= 0 or depth == 0 or width == 0:
        return out
    # heap entries: (-cum_score, tiebreak, path, cum_score_of_parent)
    heap: list = [(-float(score[0, 0]), 0, (0,), 0.0)]
    tick = 1
    while heap and len(out) < n_nodes:
        neg, _, path, parent_score = heapq.heappop(heap)
        s = -neg
        if not np.isfinite(s):
            break
        out.append((path, s))
        d, r = len(path) - 1, path[-1]
        if r + 1 < width:  # next sibling
            sib = path[:-1] + (r + 1,)
            heapq.heappush(heap, (-(parent_score + float(score[d, r + 1])), tick, sib, parent_score))
            tick += 1
        if d + 1 < depth:  # first child
            heapq.heappush(heap, (-(s + float(score[d + 1, 0])), tick, path + (0,), s))
            tick += 1
    return out


def static_topology(acc: np.ndarray, budget: int) -> Topology:
    """The rank paths of the tree with `budget` nodes (root included) that maximises
    sum over nodes of prod acc[depth, rank] along the path."""
    acc = np.asarray(acc, dtype=np.float64)
    # a rank whose measured acceptance is not monotone still works: the heap orders by score
    with np.errstate(divide="ignore"):
        score = np.log(np.clip(acc, 0.0, 1.0))
    order = np.argsort(-score, axis=1, kind="stable")  # rank order per depth by acceptance
    sorted_score = np.take_along_axis(score, order, axis=1)
    picked = _best_first(sorted_score, budget - 1)
    return [tuple(int(order[d, r]) for d, r in enumerate(p)) for p, _ in picked]


def expected_accepted(topology: Topology, acc: np.ndarray) -> float:
    """Expected tokens per round (accepted nodes + the bonus token) under independence."""
    acc = np.asarray(acc, dtype=np.float64)
    return 1.0 + float(sum(np.prod([acc[d, r] for d, r in enumerate(p)]) for p in topology))


def tree_from_topology(root: int, topology: Topology, ids: np.ndarray, budget: int | None = None) -> TokenTree:
    """Instantiate a static topology with this round's candidates (ids[k, r])."""
    K, k = ids.shape
    paths = []
    for p in topology:
        if len(p) > K or max(p) >= k:
            continue
        paths.append([int(ids[d, r]) for d, r in enumerate(p)])
    return merge_paths(root, paths, budget if budget is not None else len(topology) + 1)


def dynamic_tree(
    root: int, ids: np.ndarray, logprobs: np.ndarray, budget: int, max_depth: int | None = None
) -> TokenTree:
    """Best `budget - 1` nodes by cumulative head log-probability (parents always included)."""
    ids = np.asarray(ids)
    lp = np.asarray(logprobs, dtype=np.float64)
    if max_depth is not None:
        ids, lp = ids[:max_depth], lp[:max_depth]
    picked = _best_first(lp, budget - 1)
    return merge_paths(root, [[int(ids[d, r]) for d, r in enumerate(p)] for p, _ in picked], budget)


def node_paths(tree: TokenTree) -> list[list[int]]:
    """For every non-root node in index order, the tokens from below the root down to it.

    Feeding these to `merge_paths` rebuilds the same tree; truncating the list drops the
    highest-index nodes first (best-first builders put their best nodes first)."""
    paths: list[list[int]] = [[]]
    for i in range(1, len(tree)):
        paths.append(paths[tree.parents[i]] + [tree.tokens[i]])
    return paths[1:]


def merge_trees(root: int, first: Sequence[Sequence[int]], tree: TokenTree, budget: int) -> TokenTree:
    """Merge token paths (e.g. ngram continuations) ahead of a head tree, within `budget`."""
    return merge_paths(root, [list(p) for p in first] + node_paths(tree), budget)


def measure_acceptance(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Calibration: acc[d, r] = P(head d's rank-r candidate == label) over positions.

    ids [N, K, k] (candidates), labels [N, K] (the target's token, -1 = none)."""
    N, K, k = ids.shape
    acc = np.zeros((K, k))
    for d in range(K):
        ok = labels[:, d] >= 0
        if ok.any():
            acc[d] = (ids[ok, d, :] == labels[ok, d, None]).mean(0)
    return acc
