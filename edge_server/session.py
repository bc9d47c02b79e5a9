"""A generation session: its KV cache, what it has generated, and one verification round.

Rounds are exact: the server computes the target's choice after every tree node (argmax or
one seeded sample), keeps the longest root path the target agrees with, commits only those
positions to the KV cache, and appends the target's own choice after the last accepted node
(the bonus token). Limits (stop tokens, max_new_tokens, context) are applied here, once.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from edge_server.sampling import Sampling, choose_tokens
from edge_server.verifier import ForwardResult, TargetModel
from shared.protocol import pb
from shared.tree import TokenTree


@dataclass
class RoundResult:
    tokens: list[int]  # accepted draft tokens, then the bonus token (after limits)
    hidden: torch.Tensor | None  # hidden state at the node whose choice is the last token
    finish: int  # pb.FinishReason
    compute_ms: float
    tree_size: int


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
    round: int = 0
    finish: int = pb.FINISH_NONE
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def bonus(self) -> int:
        """The last generated token: tree root, not yet in the KV cache."""
        return self.generated[-1]

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.generated

    def release(self) -> None:
        self.cache = None

    def prefill(self, target: TargetModel) -> RoundResult:
        started = time.perf_counter()
        self.cache = target.new_cache()
        out = target.prefill(self.cache, self.prompt_ids)
        self.committed = len(self.prompt_ids)
        last = len(self.prompt_ids) - 1
        return self._finish_round(target, out, [last], [last], started, tree_size=len(self.prompt_ids))

    def verify(self, target: TargetModel, tree: TokenTree) -> RoundResult:
        started = time.perf_counter()
        out = target.forward_tree(self.cache, self.committed, tree)
        choices = choose_tokens(out.logits, self.params, self.generator)
        path = tree.accepted_path(choices)
        self.committed = target.commit(self.cache, self.committed, path)
        self.round += 1
        # The newly generated tokens are the accepted non-root nodes, then the bonus choice.
        drafted = [tree.tokens[i] for i in path[1:]]
        return self._finish_round(target, out, path, choices, started, tree_size=len(tree),
                                  drafted=drafted)

    def _finish_round(self, target: TargetModel, out: ForwardResult, path: list[int],
                      choices: list[int], started: float, tree_size: int,
                      drafted: list[int] | None = None) -> RoundResult:
        last = path[-1]
        if drafted is None:  # prefill: the only choice is the one after the last prompt token
            bonus = choose_tokens(out.logits[last:last + 1], self.params, self.generator)[0]
            new = [bonus]
        else:
            new = drafted + [choices[last]]
        new, finish = self._apply_limits(new, target.max_context)
        self.generated.extend(new)
        self.finish = finish
        hidden = out.hidden[last] if self.want_hidden else None
        return RoundResult(new, hidden, finish, (time.perf_counter() - started) * 1e3, tree_size)

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
