"""The target's choice at every tree node: argmax, or one seeded sample per node.

Exactness: at temperature 0 a child is accepted iff it is the argmax at its parent, which
reproduces greedy decoding. At temperature > 0 the server draws one token per node from the
processed target distribution; following a child only when it equals its parent's draw means
every emitted token is a draw from the target distribution (the draft is deterministic and
needs no draft probabilities), so the output distribution equals plain sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(temperature: float, top_p: float, top_k: int, vocab_size: int) -> str | None:
    """Returns what is wrong with the parameters, or None when they are usable."""
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 100.0:
        return f"temperature {temperature} must be a finite number in [0, 100] (0 = greedy)"
    if not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
        return f"top_p {top_p} must be a finite number in [0, 1] (0 or 1 = off)"
    if top_k > vocab_size:
        return f"top_k {top_k} exceeds the vocabulary size {vocab_size} (0 = off)"
    return None


def processed_probs(logits: torch.Tensor, params: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on [n, V] logits; rows sum to 1."""
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


def choose_tokens(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> list[int]:
    """The target's token after each of the n nodes: from [n, V] logits, or, greedy, [n] tokens
    the target already chose (TargetModel.forward_rows for greedy rows)."""
    if params.greedy:
        return (logits.argmax(dim=-1) if logits.is_floating_point() else logits).tolist()
    probs = processed_probs(logits, params)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).tolist()
