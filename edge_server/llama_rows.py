"""A Llama-family model's forward over a ragged batch, without transformers' module glue.

Why: most of a CPU step that is not products is Python around small ops. In a 4-session bf16
decoding step of SmolLM2-135M on one core (36.5 ms), the products took ~20 ms and the
attention kernel ~4; much of the rest was transformers' layers calling their modules (~400
module calls a step through torch's hook machinery, keyword plumbing and deprecation wrappers
on every layer). This runs the same torch ops in the same order on the same numbers, called
directly (the norms through their own `forward`, q and k rotated in one pass with transformers'
`rotate_half`: elementwise, so the same numbers), so every output is
bitwise what the model's own forward gives (tests/test_llama_rows.py, fp32 and bf16; the bf16
lossless references decode through this forward, the fp32 ones are `generate()`). Steps cost
0.87-0.96x (`scripts/bench_step.py --forward both`, bf16, one thread, 1-8 sessions, 1-8 nodes).

Used for the Llama family as transformers (4.57) writes it: `LlamaModel` (Llama, SmolLM2, ...),
`MistralModel` and `Qwen2Model`, whose layers are Llama's with a sliding window on some
(`_family`); other architectures keep their own forward with the ragged cache and attention
(edge_server.kv_cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half  # Mistral's and Qwen2's are the same code

from edge_server.kv_cache import RaggedBatch, ragged_attention, write_rows


def _family() -> dict:
    """Base model class -> (its decoder layer class, the sliding window a layer's attention passes
    on: None for full attention)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {llama.LlamaModel: (llama.LlamaDecoderLayer, lambda attn: None),
            mistral.MistralModel: (mistral.MistralDecoderLayer,
                                   lambda attn: getattr(attn.config, "sliding_window", None)),
            qwen2.Qwen2Model: (qwen2.Qwen2DecoderLayer, lambda attn: attn.sliding_window)}


class _Attention:
    """What attention reads of a Llama-family attention module: its projections' forwards (as
    fitted by edge_server.verifier.fit_cpu_products), shapes and sliding window. `layer_idx` is
    what ragged_attention asks of the module it is given."""

    def __init__(self, attn: nn.Module, layer: int, window: int | None):
        self.layer_idx = layer
        self.q, self.k, self.v, self.o = (attn.q_proj.forward, attn.k_proj.forward, attn.v_proj.forward,
                                          attn.o_proj.forward)
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.window = window


class _Layer:
    """What a decoder layer's forward reads: its norms' own forwards (their code, so their numbers,
    without the module call), its attention, and its MLP's projections (fitted forwards) and
    activation."""

    def __init__(self, layer: nn.Module, index: int, window: int | None):
        self.norm1 = layer.input_layernorm.forward
        self.attn = _Attention(layer.self_attn, index, window)
        self.norm2 = layer.post_attention_layernorm.forward
        mlp = layer.mlp
        self.gate, self.up, self.act, self.down = (mlp.gate_proj.forward, mlp.up_proj.forward, mlp.act_fn,
                                                   mlp.down_proj.forward)


class LlamaRows:
    """`forward(batch, ids, positions)` -> final hidden states [T, d] of a ragged batch."""

    @staticmethod
    def fits(base: nn.Module) -> bool:
        layer_type, _ = _family().get(type(base), (None, None))
        return layer_type is not None and all(type(layer) is layer_type for layer in base.layers)

    def __init__(self, base: nn.Module):
        window = _family()[type(base)][1]
        self.base = base
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.forward
        self.layers = [_Layer(layer, i, window(layer.self_attn))
                       for i, layer in enumerate(base.layers[:base.config.num_hidden_layers])]

    def forward(self, batch: RaggedBatch, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [1, T]."""
        h = F.embedding(ids, self.embed)
        cos, sin = self.base.rotary_emb(h, positions)  # [1, T, head_dim]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # over [1, T, heads, head_dim]
        for layer in self.layers:
            h = h + self._attention(layer.attn, layer.norm1(h), cos, sin, batch)
            x = layer.norm2(h)
            h = h + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        return self.norm(h)[0]

    @staticmethod
    def _attention(attn: _Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: RaggedBatch) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q, k = attn.q(x).view(shape), attn.k(x).view(shape)
        heads = q.shape[2]
        qk = torch.cat((q, k), dim=2)  # [1, T, heads + kv_heads, head_dim]: one rotation for both
        qk = (qk * cos) + (rotate_half(qk) * sin)
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        v = attn.v(x).view(shape).transpose(1, 2)
        write_rows(batch, attn.layer_idx, k, v)
        out, _ = ragged_attention(attn, q, k, v, None, scaling=attn.scaling, sliding_window=attn.window,
                                  edgespec_batch=batch)
        return attn.o(out.reshape(*x.shape[:-1], -1).contiguous())
