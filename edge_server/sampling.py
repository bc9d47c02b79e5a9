"""The target's choice at every tree node: argmax, or a seeded draw keyed by position.

Exactness: at temperature 0 a child is accepted iff it is the argmax at its parent, which
reproduces greedy decoding. At temperature > 0 the token for sequence position p is
argmax(scores + G_p) over the processed scores (temperature, top-k, top-p), where G_p is a
vector of Gumbel noise drawn from (seed, p) alone (the Gumbel-max trick: a draw from
softmax(scores)). Following a child only when it equals its parent's choice makes every emitted
token that draw, given the tokens before it, with noise independent of them, so the output is
plain sampling from the target. And since the noise depends on the position only, not on the
tree, the round or the batch, a seeded request gives the same tokens whatever drafter, tree
size, mode or load produced them: the server decoding alone with that seed is the reference,
token for token, as greedy decoding is at temperature 0. (A generator advanced once per node
would give the same distribution but different tokens for every tree shape.)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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


def processed_scores(logits: torch.Tensor, params: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on [n, V] logits: scores whose softmax is
    the distribution to sample (dropped tokens at -inf)."""
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        scores = _nucleus(scores, params.top_p)
    return scores


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drops a token when the mass of the likelier ones already reaches top_p (keeps at least
    one). Only the likeliest tokens are ranked, widening the ranking until the mass it covers
    reaches top_p (no token past it can be kept): sorting all 49,152 scores of a row took ~3.5
    ms on this CPU, as much as a decoding step's share of a row; the top 64 take ~0.1 ms."""
    probs = torch.softmax(scores, dim=-1)
    vocab = scores.shape[-1]
    k = min(vocab, 64)
    while True:
        top, order = torch.topk(probs, k, dim=-1)  # sorted, likeliest first
        mass = top.cumsum(dim=-1)
        if k == vocab or bool((mass[..., -1] >= top_p).all()):
            break
        k = min(vocab, 8 * k)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, (mass - top) < top_p)
    return scores.masked_fill(~keep, float("-inf"))


def draw(scores: torch.Tensor, seed: int, position: int) -> int:
    """The token at sequence `position` from [V] processed scores: Gumbel-max with noise from
    (seed, position) alone (-log of Exp(1) variates, float64 so the noise's tail is not cut
    short)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, position))))
    noise = -np.log(rng.standard_exponential(scores.shape[-1]))
    return int(np.argmax(scores.cpu().numpy().astype(np.float64) + noise))


class TargetChoices:
    """The target's token after each node of a round (`choices[i]`), as the acceptance walk asks
    for them: greedy rows come chosen (the argmax, or TargetModel.forward_rows's greedy tokens);
    a draw costs a pass over the vocabulary, so at temperature > 0 only the nodes the walk
    reaches are drawn, one per emitted token, not one per node (torch.multinomial over
    SmolLM2's 49,152 tokens took ~2 ms a node on this CPU, a draw ~0.3 ms)."""

    def __init__(self, logits: torch.Tensor, params: Sampling, positions: Sequence[int]):
        """logits: [n, V] (or [n] greedy tokens); positions[i]: the sequence position of the
        token chosen after node i."""
        self.logits, self.params, self.positions = logits, params, positions
        self.chosen: dict[int, int] = {}
        if params.greedy:
            tokens = logits.argmax(dim=-1) if logits.is_floating_point() else logits
            self.chosen = dict(enumerate(tokens.tolist()))

    def __getitem__(self, node: int) -> int:
        if node not in self.chosen:
            scores = processed_scores(self.logits[node:node + 1], self.params)[0]
            self.chosen[node] = draw(scores, self.params.seed, self.positions[node])
        return self.chosen[node]
