"""Prompt prefixes whose K/V the server keeps, so a prompt that starts the same way skips them.

Why: devices resend what they sent before. A chat sends the whole conversation again each turn,
devices asking about one document each send the document, and on one CPU core a 1,500-token
prompt takes ~3.3 s to feed (SmolLM2-135M, bf16), most of a short answer's time.

A prompt still being fed is a source too: a prompt that shares whole chunks with one fed ahead
of it copies what that one has fed and waits for the rest, instead of computing the same chunks
beside it (devices asking about one document at the same moment).

Exact by construction, not by tolerance: prompts are fed in whole chunks of `prefill_chunk`
tokens counted from position 0 (edge_server.scheduler), and a chunk's K/V depend only on its
tokens, its positions and the keys before it, not on the other rows of its step. So only whole
chunks of a prompt are kept, and a prompt that reuses k of them continues at chunk k: every
chunk it still feeds is the chunk a fresh prefill feeds, over bitwise the same keys, and every
position reused holds the bits that chunk would have written (tests/test_prompt_cache.py
compares the K/V). The prompt's partial last chunk and generated tokens are kept only from a
generation whose stream ended before it finished (edge_server.scheduler keeps it at release),
for that generation's resumption (Start.resume_token_ids): it sends the same prompt, whose
partial chunk it would feed the same way, and then feeds the tokens as one-token steps
(edge_server.session), as the first stream computed them, so it can take them all. A prompt
fed afresh computes such positions in a full chunk, so to any other prompt that entry gives only
its whole chunks.

Memory: entries are KV slots from the session pool, at most `budget_tokens` positions in all,
least recently used dropped first; they never keep a session out (Scheduler.admit drops
entries before it refuses one)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_server.kv_cache import KVBudgetError, KVPool, Slot


@dataclass
class _Entry:
    tokens: np.ndarray  # the positions held: whole prompt chunks, or a prompt and generated tokens
    slot: Slot  # their K/V at positions 0..len(tokens)-1
    chunked: int  # how many of them were fed as prompt chunks; the rest were one-token steps


# a prompt being fed ahead of another: its ids, its slot (None: only counting) and positions fed
Ahead = tuple[Sequence[int], Slot | None, int]


class PromptCache:
    def __init__(self, pool: KVPool, chunk: int, budget_tokens: int):
        self.pool, self.chunk, self.budget_tokens = pool, chunk, budget_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, tokens: Sequence[int], slot: Slot, fed: int, prompt: int | None = None) -> None:
        """Keeps what `slot` holds of `tokens`' first `fed` positions (no later write touches
        them): the whole chunks of a prompt; for a generation that ended unfinished (`prompt`:
        its prompt's length; the positions after it were one-token steps), all of them once its
        prompt is in."""
        whole = prompt is not None and fed >= prompt
        n = fed if whole else min(fed, len(tokens)) // self.chunk * self.chunk
        if n == 0 or n > self.budget_tokens:
            return
        held, chunked = np.asarray(tokens[:n], dtype=np.int64), prompt if whole else n
        for key, e in list(self._entries.items()):
            if self._covers(e.tokens, e.chunked, held, chunked):  # already kept
                self._entries.move_to_end(key)
                return
            if self._covers(held, chunked, e.tokens, e.chunked):  # this one extends it
                self._drop(key)
        while self._entries and self.tokens + n > self.budget_tokens:
            self._drop(next(iter(self._entries)))
        try:
            kept = self.pool.allocate(n)
        except KVBudgetError:  # the sessions need the memory
            return
        kept.storage.copy_(slot.storage[:, :, :, :n])
        kept.length = n
        self._entries[self._next] = _Entry(held, kept, chunked)
        self._next += 1

    def _covers(self, tokens: np.ndarray, chunked: int, other: np.ndarray, other_chunked: int) -> bool:
        """Whether an entry gives every position another would: it holds the other's tokens,
        computed the same way: as whole chunks where the other holds only whole chunks, else
        after a prompt of the same length (a partial last chunk is that prompt's own)."""
        if other_chunked == len(other) and len(other) % self.chunk == 0:
            same_way = chunked >= len(other)
        else:
            same_way = chunked == other_chunked
        return same_way and self._common(tokens, other) == len(other)

    def restore(self, ids: Sequence[int], slot: Slot, fed: int, ahead: Sequence[Ahead] = (),
                resumed: int = 0) -> tuple[int, bool]:
        """Copies into `slot` what is already computed of `ids` (a prompt, then `resumed` tokens of
        a generation being resumed) past its first `fed` positions: the longest run a kept entry
        holds, or a prompt fed ahead of this one has fed. Returns the new fed count, and whether
        one of those prompts will feed more of the chunks this one shares with it: then this one
        waits for them instead of computing them too. The last position is always fed here,
        since its logits give the first token."""
        if not self._may_share(ids, fed, resumed):
            return fed, False
        ids = np.asarray(ids, dtype=np.int64)
        best, length, coming = None, fed, 0
        for tokens, chunked, src, ready, key in self._sources(ahead):
            reusable = self._reusable(tokens, chunked, ids, resumed)
            if key is None:
                coming = max(coming, reusable)
            if min(reusable, ready) > length:
                best, length = (src, key), min(reusable, ready)
        if best is not None:
            src, key = best
            if key is not None:
                self._entries.move_to_end(key)
            slot.storage[:, :, :, fed:length].copy_(src.storage[:, :, :, fed:length])
            slot.length = length
        return length, coming > length

    def held(self, ids: Sequence[int], fed: int, ahead: Sequence[Ahead] = (), resumed: int = 0) -> int:
        """How many of `ids`' positions need no computing: `fed`, or the longest run a kept entry
        holds or a prompt ahead of it has fed or will feed (see restore)."""
        if not self._may_share(ids, fed, resumed):
            return fed
        ids = np.asarray(ids, dtype=np.int64)
        return max([fed] + [self._reusable(tokens, chunked, ids, resumed) if key is None
                            else min(self._reusable(tokens, chunked, ids, resumed), ready)
                            for tokens, chunked, _, ready, key in self._sources(ahead)])

    def _may_share(self, ids: Sequence[int], fed: int, resumed: int) -> bool:
        """Whether positions of `ids` past `fed` could come from elsewhere: not with the cache
        off, nor for a prompt whose remaining chunks are all its own (a short one, say), which
        then costs no comparison on each step it waits in."""
        most = len(ids) - 1 if resumed else (len(ids) - 1) // self.chunk * self.chunk
        return bool(self.budget_tokens) and most > fed

    def _sources(self, ahead: Sequence[Ahead]) -> list[tuple]:
        """(ids, positions fed as chunks, slot, positions ready, entry key or None for a prompt
        ahead) of every source."""
        return [(e.tokens, e.chunked, e.slot, len(e.tokens), key) for key, e in self._entries.items()] + [
            (np.asarray(other, dtype=np.int64), len(other), src, ready, None) for other, src, ready in ahead]

    def _reusable(self, tokens: np.ndarray, chunked: int, ids: np.ndarray, resumed: int) -> int:
        """The positions of `ids` a source holding `tokens` (the first `chunked` fed as prompt
        chunks) gives: with the same prompt, the prompt and the steps after it both share; else
        the whole chunks both prompts share. Short of the last position of `ids`."""
        prompt, common = len(ids) - resumed, self._common(tokens, ids)
        if resumed and chunked == prompt and common >= prompt:
            return min(common, len(ids) - 1)
        return min(common, chunked, prompt, len(ids) - 1) // self.chunk * self.chunk

    def make_room(self, tokens: int) -> None:
        """Drops entries, least recently used first, until the pool has `tokens` free (or none
        is left)."""
        while self._entries and self.pool.free_tokens < tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.pool.free(self._entries.pop(key).slot)

    @staticmethod
    def _common(a: np.ndarray, b: np.ndarray) -> int:
        """Length of the common prefix of two token arrays."""
        m = min(len(a), len(b))
        differ = np.flatnonzero(a[:m] != b[:m])
        return int(differ[0]) if len(differ) else m
