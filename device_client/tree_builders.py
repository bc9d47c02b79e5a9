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
- Unified trees: one best-first tree over head candidates and prompt-lookup continuations
  together. Every candidate child gets P(accepted | its parent was accepted) from a small
  calibrated model (`AcceptanceModel`, fitted on held-out sequences by
  scripts/calibrate_tree.py and stored in heads.json `tree_calibration`), so a head token, an
  ngram token and a token both propose compete on one scale instead of through a fixed budget
  share, and a long verbatim match can run deeper than the heads reach.
"""
from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from shared.tree import TokenTree, merge_paths, node_price

if TYPE_CHECKING:
    from device_client.drafters.ngram import NgramIndex

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


def within_depth(tree: TokenTree, max_depth: int) -> TokenTree:
    """The tree without its nodes deeper than `max_depth` (kept in order, so parents stay first).

    The server refuses a tree whose deepest node would sit past its context; near the end of
    the context the device cuts its draft instead of losing the round."""
    if tree.max_depth <= max_depth:
        return tree
    return tree.keep([i for i, d in enumerate(tree.depths) if d <= max(max_depth, 0)])


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


TREE_CALIBRATION_FORMAT = 1


@dataclass(frozen=True)
class TreeFeatures:
    """How a candidate child is described to the acceptance model: three categorical features.

    - head: (depth, log-prob bin) when the head for that depth proposed the token; else "not
      proposed by the head at this depth", or "below the deepest head";
    - ngram: (longest match length n, capped at n_buckets; kind, see NgramIndex.candidates),
      or "not an ngram continuation";
    - copy: the session's recent copy rate (NgramIndex.copy_rate) in buckets, for ngram tokens
      only: a copying answer makes every lookup more trustworthy.
    Calibration and the device must encode alike, so both call `encode`.
    """

    num_heads: int = 4
    lp_edges: tuple[float, ...] = (-0.1, -0.25, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
    n_buckets: int = 8
    copy_buckets: int = 8
    max_n: int = 8
    max_occurrences: int = 16
    copy_window: int = 16

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Table sizes (head, ngram, copy)."""
        k = self.num_heads
        return k * (len(self.lp_edges) + 1) + k + 1, self.n_buckets * 4 + 1, self.copy_buckets + 2

    def lp_bin(self, lp: float) -> int:
        """Bin of a log-prob: how many edges (descending) lie above it: 0 for lp >= the first edge."""
        return len(self.lp_edges) - bisect_right(self.lp_edges[::-1], float(lp))

    def encode(self, depth: int, ids: np.ndarray, lps: np.ndarray, ngram: dict[int, tuple[int, int]],
               copy_rate: float) -> dict[int, tuple[int, int, int]]:
        """Features of every candidate child of a node at `depth` (root 0): token -> (head,
        ngram, copy) indices. `ids`/`lps` [K, k] are the round's head candidates; `ngram` comes
        from NgramIndex.candidates for the node's context."""
        k, nb = self.num_heads, len(self.lp_edges) + 1
        h_size, n_size, _ = self.sizes
        out: dict[int, tuple[int, int, int]] = {}
        if depth < min(k, len(ids)):
            for t, lp in zip(ids[depth].tolist(), lps[depth].tolist()):
                out[t] = (depth * nb + self.lp_bin(lp), n_size - 1, 0)
            absent = k * nb + depth
        else:
            absent = h_size - 1
        cb = 1 + min(int(copy_rate * self.copy_buckets), self.copy_buckets)
        for t, (n, kind) in ngram.items():
            f = (min(n, self.n_buckets) - 1) * 4 + kind
            out[t] = (out[t][0] if t in out else absent, f, cb)
        return out

    def to_json(self) -> dict:
        return {"num_heads": self.num_heads, "lp_edges": list(self.lp_edges), "n_buckets": self.n_buckets,
                "copy_buckets": self.copy_buckets, "max_n": self.max_n,
                "max_occurrences": self.max_occurrences, "copy_window": self.copy_window}

    @classmethod
    def from_json(cls, d: dict) -> "TreeFeatures":
        return cls(int(d["num_heads"]), tuple(float(x) for x in d["lp_edges"]), int(d["n_buckets"]),
                   int(d["copy_buckets"]), int(d["max_n"]), int(d["max_occurrences"]), int(d["copy_window"]))


@dataclass(frozen=True)
class AcceptanceModel:
    """P(child accepted | parent accepted) = sigmoid(bias + head[f_h] + ngram[f_n] + copy[f_c]).

    Additive in the logit so that a token proposed by both a head and a lookup is more likely
    than by either alone, with few enough numbers to calibrate on a few thousand positions.
    Weights are plain lists: the builder indexes them ~10 times per node.
    """

    features: TreeFeatures
    head: tuple[float, ...]
    ngram: tuple[float, ...]
    copy: tuple[float, ...]
    bias: float

    def __post_init__(self) -> None:
        got = (len(self.head), len(self.ngram), len(self.copy))
        if got != self.features.sizes:
            raise ValueError(f"tree calibration tables have sizes {got}, its features need {self.features.sizes}")

    def scorer(self, ids: np.ndarray, lps: np.ndarray, copy_rate: float) -> Callable[[int, dict], list]:
        """children(depth, ngram) -> (P(accept | parent accepted), token) for every candidate
        child, best first, for one round: the logit of `features.encode` (which calibration
        uses; a test checks the two agree), with the heads' part of each depth computed once per
        round rather than once per node, and a node without lookup candidates reusing its
        depth's sorted list (the builder calls this ~budget times)."""
        f, nb = self.features, len(self.features.lp_edges) + 1
        k, (hs, ns, _) = min(f.num_heads, len(ids)), f.sizes
        cb = 1 + min(int(copy_rate * f.copy_buckets), f.copy_buckets)
        no_ng, ng_w = self.ngram[ns - 1] + self.copy[0], [w + self.copy[cb] for w in self.ngram]
        heads = [{t: self.bias + self.head[d * nb + f.lp_bin(lp)] for t, lp in zip(ids[d].tolist(), lps[d].tolist())}
                 for d in range(k)]
        plain = [sorted(((_sigmoid(z + no_ng), t) for t, z in h.items()), reverse=True) for h in heads]

        def children(depth: int, ngram: dict[int, tuple[int, int]]) -> list[tuple[float, int]]:
            if not ngram:
                return plain[depth] if depth < k else []
            base = heads[depth] if depth < k else {}
            absent = self.bias + self.head[f.num_heads * nb + depth if depth < k else hs - 1]
            z = {t: v + no_ng for t, v in base.items()}
            for t, (n, kind) in ngram.items():
                z[t] = base.get(t, absent) + ng_w[(min(n, f.n_buckets) - 1) * 4 + kind]
            return sorted(((_sigmoid(v), t) for t, v in z.items()), reverse=True)

        return children

    def to_json(self) -> dict:
        r = lambda v: [round(float(x), 4) for x in v]  # noqa: E731
        return {"format": TREE_CALIBRATION_FORMAT, "features": self.features.to_json(),
                "weights": {"bias": round(float(self.bias), 4), "head": r(self.head), "ngram": r(self.ngram),
                            "copy": r(self.copy)}}

    @classmethod
    def from_json(cls, d: dict) -> "AcceptanceModel":
        if int(d.get("format", 0)) != TREE_CALIBRATION_FORMAT:
            raise ValueError(f"tree calibration format {d.get('format')} is not {TREE_CALIBRATION_FORMAT}; "
                             "rerun scripts/calibrate_tree.py")
        w = d["weights"]
        return cls(TreeFeatures.from_json(d["features"]), tuple(w["head"]), tuple(w["ngram"]), tuple(w["copy"]),
                   float(w["bias"]))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def unified_tree(context: Sequence[int], ids: np.ndarray, lps: np.ndarray, budget: int,
                 model: AcceptanceModel, index: "NgramIndex | None" = None,
                 node_prices: Sequence[float] = ()) -> TokenTree:
    """The `budget - 1` nodes with the highest P(path accepted) = product of the calibrated
    per-child probabilities along the path, over head candidates and (with `index`) prompt
    lookups below every node, up to the first node below its price (`node_prices`, the
    server's at its load: a confident round gets a deep tree, a doubtful one a small tree or
    none, instead of the same size for both). The root is `context[-1]`.

    Products only shrink down a path, so popping the best frontier child from a heap adds parents
    before children and yields the budget's best node set. Each node's children are scored
    once, when the node is added; only its best not-yet-added child sits on the heap.
    """
    root = int(context[-1])
    if index is not None:
        index.sync(context)
    children = model.scorer(ids, lps, index.copy_rate() if index is not None else 0.0)
    tail = [int(t) for t in context[-model.features.max_n:]]  # lookups need only the last max_n tokens
    tokens, parents, scores, paths = [root], [-1], [1.0], [[]]
    heap: list = []  # (-P(path), tiebreak, parent, parent's children best first, which child)
    tick = itertools.count()

    def expand(i: int) -> None:
        ng = index.candidates((tail + paths[i])[-model.features.max_n:]) if index is not None else {}
        kids = children(len(paths[i]), ng)
        if kids:
            heapq.heappush(heap, (-scores[i] * kids[0][0], next(tick), i, kids, 0))

    expand(0)
    while heap and len(tokens) < budget and -heap[0][0] >= node_price(node_prices, len(tokens) + 1):
        neg, _, p, kids, j = heapq.heappop(heap)
        tokens.append(kids[j][1])
        parents.append(p)
        scores.append(-neg)
        paths.append(paths[p] + [kids[j][1]])
        if j + 1 < len(kids):  # the parent's next-best child takes this one's place
            heapq.heappush(heap, (-scores[p] * kids[j + 1][0], next(tick), p, kids, j + 1))
        expand(len(tokens) - 1)
    return TokenTree(tuple(tokens), tuple(parents))
