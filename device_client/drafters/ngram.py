"""Prompt lookup: propose what followed earlier occurrences of the context's last n tokens.

Training-free and cheap; it shines when the answer repeats the prompt or itself (code, lists,
quotes). Several occurrences give several branches, merged into one tree: longer matches and
more recent occurrences first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from shared.tree import TokenTree, merge_paths


def lookup_continuations(context: Sequence[int], max_ngram: int = 4, min_ngram: int = 1,
                         depth: int = 8, max_paths: int = 8) -> list[list[int]]:
    """Continuations of earlier matches of the context's suffix, best first."""
    ctx = np.asarray(context, dtype=np.int64)
    paths: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for n in range(min(max_ngram, len(ctx) - 1), min_ngram - 1, -1):
        windows = sliding_window_view(ctx[:-1], n)  # matches must end before the last token
        starts = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
        for start in starts[::-1]:  # most recent first
            cont = ctx[start + n: start + n + depth].tolist()
            key = tuple(cont)
            if cont and key not in seen:
                seen.add(key)
                paths.append(cont)
                if len(paths) >= max_paths:
                    return paths
    return paths


class NgramDrafter:
    name = "ngram"
    needs_hidden_state = False

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, depth: int = 8):
        self.max_ngram, self.min_ngram, self.depth = max_ngram, min_ngram, depth

    def propose(self, context: Sequence[int], hidden: np.ndarray | None, budget: int) -> TokenTree:
        paths = lookup_continuations(context, self.max_ngram, self.min_ngram,
                                     depth=min(self.depth, max(budget - 1, 0)))
        return merge_paths(context[-1], paths, budget)
