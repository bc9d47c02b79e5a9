"""The token tree: the one owner of tree structure for the device and the server.

Nodes are in topological order. Node 0 is the root, the bonus token of the previous round:
already generated, not yet in the server's KV cache. Every other node's parent index is
smaller than its own. The server rebuilds everything it needs (depths, the ancestor mask,
position ids, the accepted path) from the parent indices alone, so the wire carries only
one token id and one parent index per node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class TreeError(ValueError):
    """A tree that cannot be verified; the message says what to change."""


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # parents[0] == -1 for the root
    depths: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise TreeError(
                f"tree has {len(self.tokens)} tokens but {len(self.parents)} parent indices; "
                "send one parent index per node"
            )
        if not self.tokens:
            raise TreeError("tree is empty; it needs at least the root")
        if self.parents[0] != -1:
            raise TreeError("node 0 is the root and has no parent (-1)")
        depths = [0]
        for i in range(1, len(self.parents)):
            p = self.parents[i]
            if not 0 <= p < i:
                raise TreeError(
                    f"node {i} has parent {p}; parents must come before their children "
                    f"(0 <= parent < {i})"
                )
            depths.append(depths[p] + 1)
        object.__setattr__(self, "depths", tuple(depths))

    @classmethod
    def root_only(cls, root: int) -> "TokenTree":
        return cls((root,), (-1,))

    @classmethod
    def from_wire(cls, root: int, tokens: Sequence[int], parents: Sequence[int]) -> "TokenTree":
        """Build from the Draft message's non-root nodes (node i+1 = tokens[i])."""
        if len(tokens) != len(parents):
            raise TreeError(
                f"draft has {len(tokens)} tokens but {len(parents)} parents; send one parent per token"
            )
        return cls((root, *tokens), (-1, *parents))

    def to_wire(self) -> tuple[list[int], list[int]]:
        return list(self.tokens[1:]), list(self.parents[1:])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.parents)):
            kids[self.parents[i]].append(i)
        return kids

    def check_unique_siblings(self) -> None:
        seen: set[tuple[int, int]] = set()
        for i in range(1, len(self.tokens)):
            key = (self.parents[i], self.tokens[i])
            if key in seen:
                raise TreeError(
                    f"node {i} repeats token {self.tokens[i]} under parent {self.parents[i]}; "
                    "siblings must be distinct tokens"
                )
            seen.add(key)

    def ancestor_mask(self) -> np.ndarray:
        """Bool [n, n]: row i is True at i and every ancestor of i."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for i in range(n):
            if i:
                mask[i] = mask[self.parents[i]]
            mask[i, i] = True
        return mask

    def reroot(self, generated: Sequence[int]) -> "TokenTree | None":
        """The subtree under the node reached by following `generated` down from the root.

        Pipelined decoding: the server has generated these tokens after the draft's root while
        the draft was on its way; the part of the tree still ahead is the subtree rooted at the
        current last token, reindexed (its order kept, so parents still come first). None when
        the generated tokens leave the tree."""
        kids = self.children()
        node = 0
        for tok in generated:
            node = next((c for c in kids[node] if self.tokens[c] == tok), None)
            if node is None:
                return None
        if node == 0:
            return self
        below = {node}
        for i in range(node + 1, len(self.tokens)):
            if self.parents[i] in below:
                below.add(i)
        return self.keep(sorted(below))

    def keep(self, nodes: Sequence[int]) -> "TokenTree":
        """The tree of `nodes` (ascending; the first becomes the root, every other one's parent
        is among them), reindexed in the same order so parents still come first."""
        index = {n: i for i, n in enumerate(nodes)}
        parents = [-1] + [index[self.parents[n]] for n in nodes[1:]]
        return TokenTree(tuple(self.tokens[n] for n in nodes), tuple(parents))

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to `node`."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def accepted_path(self, target_tokens: Sequence[int]) -> list[int]:
        """Longest root path the target agrees with.

        `target_tokens[i]` is the target's choice after node i (argmax, or its one sample at
        temperature > 0). A child is accepted when it equals its parent's choice; since
        siblings are distinct at most one child matches, so the walk is deterministic.
        """
        kids = self.children()
        path = [0]
        node = 0
        while True:
            want = target_tokens[node]
            nxt = next((c for c in kids[node] if self.tokens[c] == want), None)
            if nxt is None:
                return path
            path.append(nxt)
            node = nxt


def price_index(size: int) -> int:
    """Which entry of Verdict.node_prices prices the node that makes a tree `size` nodes (size
    >= 2): k for 2^k < size <= 2^(k+1), one price per pair of the server's budget levels."""
    return (size - 1).bit_length() - 1


def node_price(prices: Sequence[float], size: int) -> float:
    """The price (Verdict.node_prices) of the node that makes a tree `size` nodes: its entry
    (price_index), the last one for larger trees, 0 (it pays) when the server sent none."""
    return prices[min(price_index(size), len(prices) - 1)] if prices else 0.0


def nodes_price(prices: Sequence[float], size: int) -> float:
    """What a tree of `size` nodes costs at these prices: its nodes' prices summed, root excluded
    (entry by entry, not node by node: the server prices a session's last rounds every verdict)."""
    total, first = 0.0, 2
    for k, price in enumerate(prices):
        last = size if k == len(prices) - 1 else min(size, 2 << k)  # entry k: sizes 2^k + 1 .. 2^(k+1)
        total += price * max(0, last - first + 1)
        first = (2 << k) + 1
    return total


def merge_paths(root: int, paths: Sequence[Sequence[int]], budget: int) -> TokenTree:
    """Merge token sequences that continue the root into one tree of at most `budget` nodes.

    Shared prefixes become shared nodes; earlier paths win when the budget runs out, so
    callers pass their most likely paths first.
    """
    tokens, parents = [root], [-1]
    index: dict[tuple[int, int], int] = {}
    for seq in paths:
        node = 0
        for tok in seq:
            key = (node, int(tok))
            if key not in index:
                if len(tokens) >= budget:
                    break
                index[key] = len(tokens)
                tokens.append(int(tok))
                parents.append(node)
            node = index[key]
    return TokenTree(tuple(tokens), tuple(parents))
