"""A generation session: its KV cache, what it has generated, and one verification round.

Rounds are exact: the server computes the target's choice after every tree node (argmax, or a
draw keyed by seed and position: edge_server.sampling), keeps the longest root path the target
agrees with, commits only those positions to the KV cache, and appends the target's own choice
after the last accepted node (the bonus token). Limits (stop tokens, max_new_tokens, context)
are applied here, once.

A session may resume a generation whose stream broke: `generated` then starts with the tokens
the device already has (`resumed` of them), and they are fed after the prompt as one-token
decoding steps, not as a prompt chunk, so their K/V are bitwise what the first stream's rounds
computed and the first verdict's token is the one the first stream would have sent next.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from transformers import DynamicCache

from edge_server.budget import DeviceLink
from edge_server.kv_cache import Row, Slot
from edge_server.sampling import Sampling, TargetChoices
from edge_server.verifier import TargetModel
from shared.protocol import pb
from shared.tree import TokenTree


@dataclass
class RoundResult:
    tokens: list[int]  # accepted draft tokens, then the bonus token (after limits)
    hidden: torch.Tensor | None  # hidden state at the node whose choice is the last token
    finish: int  # pb.FinishReason
    compute_ms: float
    tree_size: int
    path: list[int] = field(default_factory=lambda: [0])  # the accepted node indices, root first

    @property
    def accepted(self) -> int:
        """Accepted draft nodes (root and bonus not counted)."""
        return len(self.path) - 1


@dataclass
class Session:
    prompt_ids: list[int]
    params: Sampling
    max_new_tokens: int
    stop_ids: frozenset[int]
    want_hidden: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cache: DynamicCache | None = None
    committed: int = 0  # positions in the KV cache
    generated: list[int] = field(default_factory=list)
    resumed: int = 0  # leading generated tokens from an earlier stream of this generation, fed with the prompt
    round: int = 0
    finish: int = pb.FINISH_NONE
    cancelled: bool = False  # the device sent Cancel (it will not resume this generation)
    # batched path: a KV slot instead of a DynamicCache, the prompt fed in chunks
    slot: Slot | None = None
    prefilled: int = 0
    prompt_cached: int = 0  # prompt positions whose K/V came from the prompt cache
    speculative: bool = True
    tree_cap: int = 0  # the device's own most tree nodes per round (0 = none declared)
    accepted_tokens: int = 0  # accepted draft tokens over all rounds (bonus tokens not counted)
    tree_tokens: int = 0
    round_ends: list[int] = field(default_factory=list)  # len(generated) after each round (0 = prefill)
    # pipelined mode: the device's latest draft and its round, set by the service as drafts arrive
    draft: tuple[int, TokenTree] | None = None
    link: DeviceLink = field(default_factory=DeviceLink)  # does a tree pay for this device (its link, its yield)

    @cached_property
    def prompt_array(self) -> np.ndarray:
        """The prompt as an array, made once: the prompt cache compares it on every step the
        prompt waits in (edge_server.prompt_cache)."""
        return np.asarray(self.prompt_ids, dtype=np.int64)

    @cached_property
    def feed_array(self) -> np.ndarray:
        """What is fed before the first verdict: the prompt, then the resumed tokens."""
        return np.asarray(self.prompt_ids + self.generated[:self.resumed], dtype=np.int64)

    @property
    def rounds_left(self) -> float:
        """Rounds to max_new_tokens at this session's acceptance so far (a stop token or the
        context may end it sooner): for the retry hint of a refused device."""
        rounds = len(self.round_ends) - 1  # after the prefill's (which carries the resumed tokens)
        per_round = (len(self.generated) - self.round_ends[0]) / rounds if rounds > 0 else 1.0
        return (self.max_new_tokens - len(self.generated)) / max(1.0, per_round)

    @property
    def bonus(self) -> int:
        """The last generated token: tree root, not yet in the KV cache."""
        return self.generated[-1]

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.generated

    def root_for_round(self, draft_round: int) -> int:
        """The root of a Draft for `draft_round`: the last token of the verdict before it."""
        return self.generated[self.round_ends[draft_round - 1] - 1]

    def pipelined_tree(self, budget: int) -> TokenTree:
        """What this step verifies in pipelined mode: the latest draft re-rooted at the current
        bonus token (the tokens generated since the draft's root must lie on one of its
        paths), or the root alone when there is no draft or generation has left it. The same
        draft serves later steps too while it still reaches ahead, cut to the budget the server
        gives now: a draft made for a bigger budget (before the load grew, or during a probe)
        would otherwise keep widening steps the budget meant to keep narrow."""
        latest = self.draft
        if latest is not None:
            draft_round, tree = latest
            ahead = tree.reroot(self.generated[self.round_ends[draft_round - 1]:])
            if ahead is not None:
                return ahead if len(ahead) <= budget else ahead.keep(range(max(1, budget)))
        return TokenTree.root_only(self.bonus)

    def release(self) -> None:
        self.cache = None

    # ---- unbatched path: its own DynamicCache (reference for tests and tools) ----------
    def prefill(self, target: TargetModel) -> RoundResult:
        if self.resumed:
            raise ValueError("a resumed session is fed by the scheduler (Session.prefill_row)")
        started = time.perf_counter()
        self.cache = target.new_cache()
        out = target.prefill(self.cache, self.prompt_ids)
        self.committed = self.prefilled = len(self.prompt_ids)
        return self._after_prompt(out.logits[-1:], out.hidden[-1], target.max_context, started)

    def verify(self, target: TargetModel, tree: TokenTree) -> RoundResult:
        started = time.perf_counter()
        out = target.forward_tree(self.cache, self.committed, tree)
        return self._accept(tree, out.logits, out.hidden,
                            lambda path: target.commit(self.cache, self.committed, path),
                            target.max_context, started)

    # ---- batched path: rows of a ragged scheduler step over this session's KV slot -----
    @property
    def to_feed(self) -> int:
        """Positions fed before the first verdict: the prompt, then the resumed tokens."""
        return len(self.prompt_ids) + self.resumed

    def prefill_row(self, max_tokens: int) -> Row:
        """The next prompt chunk, or past the prompt the next resumed tokens as a chain of
        one-token queries (a tree's `visible`, which makes each a decoding step); at most
        max_tokens, logits only after the last position to feed."""
        prompt = len(self.prompt_ids)
        end = min(self.prefilled + max_tokens, prompt if self.prefilled < prompt else self.to_feed)
        chunk = self.feed_array[self.prefilled:end].tolist()  # not a new prompt + generated list per chunk
        chain = self.prefilled >= prompt and len(chunk) > 1
        return Row(self.slot, self.prefilled, chunk, list(range(self.prefilled, end)),
                   np.tril(np.ones((len(chunk), len(chunk)), dtype=bool)) if chain else None,
                   [len(chunk) - 1] if end == self.to_feed else [], self.params.greedy)

    def after_prefill_row(self, row: Row, logits: torch.Tensor, hidden: torch.Tensor, max_context: int,
                          started: float) -> RoundResult | None:
        """Advances the prefill; returns the first verdict's round once the prompt (and the
        resumed tokens) are in."""
        self.prefilled += row.n
        self.committed = self.slot.length = self.prefilled
        if self.prefilled < self.to_feed:
            return None
        return self._after_prompt(logits, hidden[-1], max_context, started)

    def tree_row(self, tree: TokenTree) -> Row:
        return Row.for_tree(self.slot, self.committed, tree, self.params.greedy)

    def after_tree_row(self, tree: TokenTree, logits: torch.Tensor, hidden: torch.Tensor, max_context: int,
                       started: float) -> RoundResult:
        return self._accept(tree, logits, hidden, lambda path: self.slot.commit_path(self.committed, path),
                            max_context, started)

    # ---- shared: exact acceptance and limits ---------------------------------------------
    def _after_prompt(self, logits: torch.Tensor, hidden: torch.Tensor, max_context: int,
                      started: float) -> RoundResult:
        bonus = self._choices(logits, [0])[0]
        return self._finish_round([bonus], hidden, max_context, started, len(self.prompt_ids))

    def _accept(self, tree: TokenTree, logits: torch.Tensor, hidden: torch.Tensor, commit,
                max_context: int, started: float) -> RoundResult:
        choices = self._choices(logits, tree.depths)
        path = tree.accepted_path(choices)
        self.committed = commit(path)
        self.round += 1
        self.accepted_tokens += len(path) - 1
        self.tree_tokens += len(tree)
        # The newly generated tokens are the accepted non-root nodes, then the bonus choice.
        new = [tree.tokens[i] for i in path[1:]] + [choices[path[-1]]]
        result = self._finish_round(new, hidden[path[-1]], max_context, started, len(tree))
        result.path = path
        return result

    def _choices(self, logits: torch.Tensor, depths: Sequence[int]) -> TargetChoices:
        """The target's choices after nodes at these depths below the last token (the root):
        the token after a node at depth d goes to position len(context) + d."""
        at = len(self.prompt_ids) + len(self.generated)
        return TargetChoices(logits, self.params, [at + d for d in depths])

    def _finish_round(self, new: list[int], hidden: torch.Tensor, max_context: int, started: float,
                      tree_size: int) -> RoundResult:
        new, finish = self._apply_limits(new, max_context)
        self.generated.extend(new)
        self.round_ends.append(len(self.generated))
        self.finish = finish
        return RoundResult(new, hidden if self.want_hidden else None, finish,
                           (time.perf_counter() - started) * 1e3, tree_size)

    def _apply_limits(self, new: list[int], max_context: int) -> tuple[list[int], int]:
        """Cuts the round's tokens at the first stop token, max_new_tokens and the context."""
        stop_at = next((i for i, tok in enumerate(new) if tok in self.stop_ids), None)
        if stop_at is not None:
            new = new[: stop_at + 1]
        length_room = self.max_new_tokens - len(self.generated)
        context_room = max_context - len(self.prompt_ids) - len(self.generated)
        new = new[: min(length_room, context_room)]
        if new and new[-1] in self.stop_ids:
            return new, pb.FINISH_STOP
        if len(new) == length_room:
            return new, pb.FINISH_LENGTH
        if len(new) == context_room:
            return new, pb.FINISH_CONTEXT
        return new, pb.FINISH_NONE
