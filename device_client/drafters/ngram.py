"""Prompt lookup: propose what followed earlier occurrences of the context's last n tokens.

Training-free and cheap; it shines when the answer repeats the prompt or itself (code, lists,
quotes). Several occurrences give several branches, merged into one tree: longer matches and
more recent occurrences first. One index of the context's n-grams serves both the ngram
drafter and the heads' unified tree, which looks up a continuation below every node it adds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from shared.tree import TokenTree, merge_paths


class NgramIndex:
    """Every n-gram of a session's context (n = 1..max_n) -> where the token after it sits.

    The unified tree builder looks up a continuation below every node it adds (the context plus
    the node's path), so lookups must be dictionary hits rather than scans of the context.
    `sync` extends the index by the tokens a round appended and rebuilds it only when the
    context was not an extension of the last one (a new session). It also records whether the
    longest-match lookup predicted each token as it arrived: the recent rate (`copy_rate`) says
    whether the text is being copied right now, which makes ngram candidates more trustworthy.
    """

    def __init__(self, max_n: int = 8, max_occurrences: int = 16, copy_window: int = 16) -> None:
        self.max_n, self.max_occurrences, self.copy_window = max_n, max_occurrences, copy_window
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.maps: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(self.max_n + 1)]
        self.hits: list[bool] = []

    def sync(self, context: Sequence[int]) -> None:
        """Make the index cover exactly `context` (incrementally when it extends the last one)."""
        ctx = [int(t) for t in context]
        m = len(self.tokens)
        if len(ctx) < m or ctx[:m] != self.tokens:
            self.reset()
            m = 0
        for tok in ctx[m:]:
            self._append(tok)

    def _append(self, tok: int) -> None:
        toks, i = self.tokens, len(self.tokens)
        if i:
            n, pos = self.lookup(toks)
            self.hits.append(bool(n) and toks[pos[-1]] == tok)
        toks.append(tok)
        for n in range(1, min(self.max_n, i) + 1):
            self.maps[n].setdefault(tuple(toks[i - n:i]), []).append(i)

    def _matches(self, suffix: Sequence[int]) -> list[list[int]]:
        """Positions after each n-gram ending `suffix`, n = 1, 2, ... up to the longest that
        occurred (an n-gram occurs only if its (n-1)-gram suffix does, so the search stops at the
        first miss: a few dictionary hits, not max_n)."""
        found: list[list[int]] = []
        for n in range(1, min(self.max_n, len(suffix)) + 1):
            pos = self.maps[n].get(tuple(suffix[-n:]))
            if not pos:
                break
            found.append(pos)
        return found

    def lookup(self, suffix: Sequence[int]) -> tuple[int, list[int]]:
        """(n, positions of the tokens that followed) for the longest n-gram ending `suffix` that
        occurred in the context, or (0, []) when not even its last token did."""
        found = self._matches(suffix)
        return (len(found), found[-1]) if found else (0, [])

    def continuations(self, suffix: Sequence[int], min_n: int = 1, depth: int = 8,
                      max_paths: int = 8) -> list[list[int]]:
        """Up to `depth` tokens after each earlier occurrence of `suffix`'s last n tokens,
        n >= min_n: longest matches first, the most recent first among equals, no repeats."""
        paths: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        found = self._matches(suffix)
        for n in range(len(found), min_n - 1, -1):
            for p in reversed(found[n - 1]):
                cont = self.tokens[p:p + depth]
                if cont and tuple(cont) not in seen:
                    seen.add(tuple(cont))
                    paths.append(cont)
                    if len(paths) >= max_paths:
                        return paths
        return paths

    def copy_rate(self) -> float:
        """Fraction of the last `copy_window` tokens that the longest match predicted."""
        h = self.hits[-self.copy_window:]
        return sum(h) / len(h) if h else 0.0

    def candidates(self, suffix: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Next tokens after `suffix`: token -> (n, kind), n the longest match it followed.

        kind 0: the only token that followed the longest match; 1: the most frequent of several
        (ties: the most recent); 2: another token after the longest match; 3: a token seen only
        after a shorter match. Only the `max_occurrences` most recent occurrences count.
        """
        out: dict[int, tuple[int, int]] = {}
        found = self._matches(suffix)
        for n in range(len(found), 0, -1):
            pos = found[n - 1][-self.max_occurrences:]
            counts: dict[int, int] = {}
            for p in reversed(pos):  # most recent first, so ties below keep recency order
                counts[self.tokens[p]] = counts.get(self.tokens[p], 0) + 1
            for r, t in enumerate(sorted(counts, key=lambda t: -counts[t])):
                if t not in out:
                    out[t] = (n, 3 if n < len(found) else (0 if counts[t] == len(pos) else 1) if r == 0 else 2)
        return out


class NgramDrafter:
    name = "ngram"
    needs_hidden_state = False

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, depth: int = 8, index: NgramIndex | None = None):
        """`index`: one already kept over the same context by another user (the unified heads
        tree), so the context is indexed once; `max_ngram` is then the index's own."""
        self.min_ngram, self.depth = min_ngram, depth
        self.index = index if index is not None else NgramIndex(max_ngram)

    def propose(self, context: Sequence[int], hidden: np.ndarray | None, budget: int,
                node_prices: Sequence[float] = ()) -> TokenTree:
        self.index.sync(context)
        paths = self.index.continuations(context, self.min_ngram, depth=min(self.depth, max(budget - 1, 0)))
        return merge_paths(context[-1], paths, budget)
