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
compares the K/V). The prompt's partial last chunk and generated tokens are not kept: their
K/V come from steps of another shape (a shorter chunk, one-token queries), and a prompt fed
afresh would compute them in a full chunk.

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
    tokens: np.ndarray  # the prompt prefix, whole chunks
    slot: Slot  # its K/V at positions 0..len(tokens)-1


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

    def keep(self, prompt: Sequence[int], slot: Slot, fed: int) -> None:
        """Keeps the whole chunks of `prompt` among its first `fed` positions, which `slot` holds
        (the prompt is in: no later write touches them; positions past it, a resumed
        generation's tokens, are not the prompt's)."""
        n = min(fed, len(prompt)) // self.chunk * self.chunk
        if n == 0 or n > self.budget_tokens:
            return
        prefix = np.asarray(prompt[:n], dtype=np.int64)
        for key, e in list(self._entries.items()):
            if self._common(e.tokens, prefix) == n:  # already kept, as long or longer
                self._entries.move_to_end(key)
                return
            if self._common(e.tokens, prefix) == len(e.tokens):  # this one extends it
                self._drop(key)
        while self._entries and self.tokens + n > self.budget_tokens:
            self._drop(next(iter(self._entries)))
        try:
            kept = self.pool.allocate(n)
        except KVBudgetError:  # the sessions need the memory
            return
        kept.storage.copy_(slot.storage[:, :, :, :n])
        kept.length = n
        self._entries[self._next] = _Entry(prefix, kept)
        self._next += 1

    def restore(self, prompt: Sequence[int], slot: Slot, fed: int,
                ahead: Sequence[tuple[Sequence[int], Slot | None, int]] = ()) -> tuple[int, bool]:
        """Copies into `slot` what is already computed of `prompt`'s whole chunks past its first
        `fed` positions: the longest run a kept entry holds, or a prompt fed ahead of this one
        (`ahead`: its ids, its slot and how many of its positions are fed) has fed. Returns the new
        fed count, and whether one of those prompts will feed more of the chunks this one shares
        with it: then this one waits for them instead of computing them too. The prompt's last
        chunk is always its own, since its last token's logits give the first token."""
        if not self._may_share(prompt, fed):
            return fed, False
        ids = np.asarray(prompt, dtype=np.int64)
        best, length, coming = None, fed, 0
        for tokens, src, ready, key in self._sources(ahead):
            shared = self._shared(tokens, ids)
            if key is None:
                coming = max(coming, shared)
            if min(shared, ready) > length:
                best, length = (src, key), min(shared, ready)
        if best is not None:
            src, key = best
            if key is not None:
                self._entries.move_to_end(key)
            slot.storage[:, :, :, fed:length].copy_(src.storage[:, :, :, fed:length])
            slot.length = length
        return length, coming > length

    def held(self, prompt: Sequence[int], fed: int,
             ahead: Sequence[tuple[Sequence[int], Slot | None, int]] = ()) -> int:
        """How many of `prompt`'s positions need no computing: `fed`, or the longest run of its
        whole chunks a kept entry holds or a prompt ahead of it has fed or will feed."""
        if not self._may_share(prompt, fed):
            return fed
        ids = np.asarray(prompt, dtype=np.int64)
        return max([fed] + [self._shared(tokens, ids) if key is None else min(self._shared(tokens, ids), ready)
                            for tokens, _, ready, key in self._sources(ahead)])

    def _may_share(self, prompt: Sequence[int], fed: int) -> bool:
        """Whether whole chunks of `prompt` past `fed` could come from elsewhere: not with the cache
        off, nor for a prompt whose remaining chunks are all its own (a short one, say), which
        then costs no comparison on each step it waits in."""
        return bool(self.budget_tokens) and (len(prompt) - 1) // self.chunk * self.chunk > fed

    def _sources(self, ahead: Sequence[tuple[Sequence[int], Slot | None, int]]) -> list[tuple]:
        """(ids, slot, positions ready, entry key or None for a prompt ahead) of every source."""
        return [(e.tokens, e.slot, len(e.tokens), key) for key, e in self._entries.items()] + [
            (np.asarray(other, dtype=np.int64), src, ready, None) for other, src, ready in ahead]

    def _shared(self, tokens: np.ndarray, ids: np.ndarray) -> int:
        """The whole chunks `ids` shares with `tokens`, short of its last chunk."""
        return min(self._common(tokens, ids), len(ids) - 1) // self.chunk * self.chunk

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
