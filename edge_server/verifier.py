"""The target model's side of verification: prefill, one forward over a tree, KV commit.

Kept free of protocol and session concerns so the same code serves the gRPC service, the
tests that compare tree logits with sequential decoding, and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from shared.tree import TokenTree


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [n, V] float32, next-token logits after each input position
    hidden: torch.Tensor  # [n, d] final (post-norm) hidden state at each input position


class TargetModel:
    def __init__(self, model: PreTrainedModel, max_context: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_context = max_context
        self.vocab_size = int(model.config.vocab_size)
        self.hidden_size = int(model.config.hidden_size)

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    @torch.inference_mode()
    def prefill(self, cache: DynamicCache, prompt_ids: list[int]) -> ForwardResult:
        """Runs the prompt causally into an empty cache."""
        n = len(prompt_ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return self._forward(cache, prompt_ids, causal, torch.arange(n), past=0)

    @torch.inference_mode()
    def forward_tree(self, cache: DynamicCache, committed: int, tree: TokenTree) -> ForwardResult:
        """One forward over every tree node; each sees the committed prefix and its ancestors."""
        mask = torch.from_numpy(tree.ancestor_mask())
        positions = committed + torch.tensor(tree.depths)
        return self._forward(cache, list(tree.tokens), mask, positions, past=committed)

    def _forward(self, cache: DynamicCache, ids: list[int], visible: torch.Tensor,
                 positions: torch.Tensor, past: int) -> ForwardResult:
        n = len(ids)
        allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), visible], dim=1)
        # Additive float mask: a boolean 4D mask is silently wrong under eager attention.
        mask = torch.zeros(n, past + n, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            attention_mask=mask[None, None].to(self.device),
            position_ids=positions[None].to(self.device),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        return ForwardResult(logits=out.logits[0].float(), hidden=out.hidden_states[-1][0])

    @staticmethod
    def commit(cache: DynamicCache, committed: int, path: list[int]) -> int:
        """Keeps the committed prefix plus the accepted tree nodes; returns the new length."""
        device = cache.layers[0].keys.device
        keep = torch.cat([torch.arange(committed), committed + torch.tensor(path)]).to(device)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)
        return committed + len(path)
