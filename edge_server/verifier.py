"""The target model's side of verification: prefill, one forward over a tree, KV commit.

Kept free of protocol and session concerns so the same code serves the gRPC service, the
tests that compare tree logits with sequential decoding, and the benchmarks.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from edge_server.greedy_head import ScreenedArgmax, outlier_channels
from edge_server.kv_cache import ATTN_NAME, KVPool, RaggedBatch, RaggedCache, Row
from edge_server.llama_rows import LlamaRows
from edge_server.onnx_products import one_thread_session
from shared.tree import TokenTree


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [n, V] float32, next-token logits after each input position
    hidden: torch.Tensor  # [n, d] final (post-norm) hidden state at each input position


PACK_ROWS = 8  # oneDNN's layout hint: the product widths a tree or batch step mostly has


def _packed_product(weight: torch.Tensor, bias: torch.Tensor | None):
    """A product over a copy of the weight that oneDNN packed once at load (the private ops
    inductor uses for frozen CPU linears; torch is pinned). Unpacked, oneDNN reorders the weight
    on every call: in bf16 a 4-row product of SmolLM2's LM head took 7.8 ms against 3.0 packed,
    a gate projection 99 against 56 us, with bitwise the same result."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    return lambda rows: torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def _reduced_precision_product(weight: torch.Tensor, bias: torch.Tensor | None):
    """Every product padded to at least 4 rows (see fit_cpu_products); bf16 on the packed weight
    where oneDNN has bf16 kernels (whole steps 0.65-0.91x, bitwise equal)."""
    packs = weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    product = _packed_product(weight, bias) if packs else (lambda rows: F.linear(rows, weight, bias))

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n < 4:
            rows = torch.cat([rows, rows.new_zeros(4 - n, rows.shape[1])])
        return product(rows)[:n].reshape(*x.shape[:-1], -1)
    return forward


def _prepacked_linear(linear: nn.Linear, transposed_row: bool = False):
    product = _packed_product(linear.weight, linear.bias)
    one_row = (_transposed_row_product(linear) if transposed_row
               else lambda x: F.linear(x, linear.weight, linear.bias))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return one_row(x)
        return product(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return forward


def _transposed_row_product(linear: nn.Linear):
    weight_t = linear.weight.detach().t().contiguous()

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x @ weight_t
        return y if linear.bias is None else y + linear.bias
    return forward


class _OnnxRuntimeLinear:
    """One linear layer as a one-node onnxruntime graph (`Gemm`, B transposed), so its products
    run on MLAS, which packs the weight once at load. The graph reads the layer's own weight
    in place (edge_server.onnx_products), so the only extra memory is MLAS's packed copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        from onnx import TensorProto, helper

        self.out_features, self.in_features = weight.shape
        self.session = one_thread_session(
            [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", self.in_features])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", self.out_features])],
            {"w": weight.detach().contiguous().numpy()})
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous().numpy()
        y = torch.from_numpy(self.session.run(None, {"x": rows})[0]).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def fit_cpu_products(model: nn.Module, threads: int | None = None) -> None:
    """Chooses how every linear layer multiplies on CPU, for cost and for exactness (measured with
    torch 2.13's oneDNN and MKL and onnxruntime 1.32's MLAS). `threads`: the CPU threads the
    server computes on (default: torch's setting).

    Reduced precision: every product of fewer than 4 rows is padded to 4. Products of 2-3 rows
    run row by row and cost more than 4 rows; and each output row of a product of 4 or more
    rows is bitwise the same whatever the other rows are, while a 1-3-row product sums in
    another order: a bf16 MLP down-projection differs for 4 of 30 random inputs, which flips
    the greedy token often enough (7 of 34 64-token generations) that a tree verified in one
    wide step would not reproduce one-token decoding. A 4-row bf16 product costs what a 1-row
    one does (LM head 7.4 vs 7.6 ms). bf16 products run on oneDNN's packed copy of each weight
    (_packed_product), a layer's q/k/v and gate/up as one product each (_SiblingProducts); on a
    Zen 4 core with native bf16 that made one session's decoding step 0.65x and eight
    sessions' 2-node trees 0.81x, bitwise the same numbers.

    fp32 on one thread (the load benchmark's server, `--threads 1`): every product goes through
    MLAS (_OnnxRuntimeLinear), a layer's q/k/v and gate/up as one product each
    (_SiblingProducts). On an AVX2 core it streams the weights for a few rows nearly as fast as
    for one, where oneDNN's and MKL's skinny products are compute-bound from ~4 rows:
    all of SmolLM2-135M's products (LM head excluded) for 1 / 2 / 4 / 8 / 16 rows took 44-60 /
    46-65 / 51-80 / 65-93 / 89-137 ms against 70 (MKL) / 84 / 85 / 110 / 121 (oneDNN packed),
    and one session's step in the server (interleaved in one process, 200 positions) costs
    0.94x for decoding and 0.68-0.76x for a 2-8-node tree; 2-8 sessions' steps 0.71-0.86x.
    Its rows are bitwise independent of the batch from one row up, so a tree node's products
    are a decoding step's exactly. With more threads each session would need its own pool
    (MLAS's global pool spins and, measured on 2 threads, doubled every step against torch's
    OpenMP threads; per-session pools without spinning were 0.9-1.18x the oneDNN path), so:

    fp32 on several threads: products of 2 or more rows use a copy of the weight that oneDNN
    packed once at load (the private ops inductor uses for frozen CPU linears; torch is
    pinned), its rows bitwise independent of the batch (1 to 64 rows checked). A single row
    keeps MKL's GEMV on the original weight (the packed layout made a decoding step ~15%
    dearer), ~1e-6 relative from the packed product. The LM head keeps a transposed copy for
    one row: `x @ W.T` with W.T contiguous streams the weight about twice as fast as the GEMV
    (7.4 vs 15.5 ms for 49,152 x 576 on an AVX2 core). Greedy rows no longer use the LM head's
    products in the server (TargetModel screens them, edge_server.greedy_head): its packed and
    transposed copies now serve sampled rows and the unbatched path."""
    threads = threads or torch.get_num_threads()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shared = _fuse_siblings(model, threads)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module not in shared:
            product = _product_maker(module.weight.dtype, threads)
            module.forward = (product(module.weight, module.bias) if product
                              else _prepacked_linear(module, transposed_row=module is head))


def _product_maker(dtype: torch.dtype, threads: int):
    """How a layer of this dtype multiplies, given its (stacked) weight and bias; None: fp32 on
    several threads, whose one-row products take another path (_prepacked_linear)."""
    if dtype != torch.float32:
        return _reduced_precision_product
    return _OnnxRuntimeLinear if threads == 1 else None


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama-style names


class _SiblingProducts:
    """Projections a layer applies to one input (q/k/v, gate/up) as one product over their
    stacked weights (fp32: one MLAS call instead of three (two); bf16: one oneDNN product, q/k/v
    40 against 67 us for 4 rows), the output sliced per member.
    On one AVX2 core, with SmolLM2-135M's shapes, q/k/v took 131 against 254 us a layer for one
    row and 300 against 427 us for 16; gate/up 252 against 289 (1 row) and 699 against 766 (8);
    whole steps at 150 positions (paired, alternating in one process) cost 0.93-0.96x for one
    session, 0.95-0.98x for four 2-node trees and 0.96-1.01x for eight rows. Each member's
    slice is bitwise its own product (a column's sum does not depend on the columns beside it;
    checked from 1 to 16 rows), so nothing downstream changes. The members' weights become
    views into the stacked one: no second copy. The layer calls its members one after another
    on the same tensor, on the one thread that runs the model; the product is kept from the
    first call to the last, and a member called on another input computes it for that input."""

    def __init__(self, members: list[nn.Linear], product):
        weight = torch.cat([m.weight.detach() for m in members])
        bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        sizes = [m.out_features for m in members]
        for m, part in zip(members, weight.split(sizes)):
            m.weight.data = part
        self.product = product(weight, bias)
        self.ends = list(itertools.accumulate(sizes))
        self._x = self._y = None
        for i, m in enumerate(members):
            m.forward = functools.partial(self._member, i)

    def _member(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            self._x, self._y = x, self.product(x)
        y = self._y[..., (self.ends[i - 1] if i else 0):self.ends[i]].contiguous()
        if i == len(self.ends) - 1:
            self._x = self._y = None  # the layer is done with this input
        return y


def _fuse_siblings(model: nn.Module, threads: int) -> set[nn.Linear]:
    """Gives every group of sibling projections (SIBLINGS) one product where their dtype has a
    batch-invariant product for any number of rows (_product_maker); returns the linears it
    took."""
    taken: set[nn.Linear] = set()
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, name, None) for name in names]
            if (all(isinstance(m, nn.Linear) for m in members)
                    and len({m.weight.dtype for m in members}) == 1
                    and len({m.in_features for m in members}) == 1
                    and len({m.bias is None for m in members}) == 1
                    and (product := _product_maker(members[0].weight.dtype, threads))):
                _SiblingProducts(members, product)
                taken.update(members)
    return taken


class TargetModel:
    def __init__(self, model: PreTrainedModel, max_context: int):
        if next(model.parameters()).device.type == "cpu":
            fit_cpu_products(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_context = max_context
        self.vocab_size = int(model.config.vocab_size)
        self.hidden_size = int(model.config.hidden_size)
        self.base = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()
        cfg = getattr(model.config, "text_config", None) or model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.num_layers = int(cfg.num_hidden_layers)
        self.screened_head = self._screened_head()
        self.llama_rows = LlamaRows(self.base) if LlamaRows.fits(self.base) else None

    @torch.inference_mode()
    def _screened_head(self) -> ScreenedArgmax | None:
        """Greedy rows' argmax through an int8 screen (edge_server.greedy_head) where it applies:
        an fp32 LM head on a CPU, without bias or logit softcapping (whose tanh can make logits
        equal that the screen tells apart). Its exact channels are the hidden state's largest
        after a forward over fixed pseudo-random tokens: outlier channels belong to the model,
        not the text (calibrating on a prompt's generation instead chose as well)."""
        head = self.lm_head
        if (self.device.type != "cpu" or head.weight.dtype != torch.float32
                or getattr(head, "bias", None) is not None or self.softcap):
            return None
        ids = torch.randint(self.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        return ScreenedArgmax(head.weight, outlier_channels(self.base(input_ids=ids).last_hidden_state[0]))

    @torch.inference_mode()
    def forward_rows(self, rows: list[Row]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One forward over a ragged batch of rows (trees, prefill chunks, decode steps), each over
        its own KV slot. Returns per row: float32 logits at its `logit_rows` (a greedy row: the
        argmax token at each, int64), and the final hidden state at every one of its tokens."""
        batch = RaggedBatch(rows, self.dtype, self.device)
        ids = torch.tensor([[t for r in rows for t in r.tokens]], device=self.device)
        pos = torch.tensor([[p for r in rows for p in r.positions]], device=self.device)
        if self.llama_rows is not None:
            hidden = self.llama_rows.forward(batch, ids, pos)
        else:
            hidden = self._module_forward(batch, ids, pos)
        return self._next_token_scores(rows, hidden), [hidden[r.start:r.start + r.n] for r in rows]

    def _module_forward(self, batch: RaggedBatch, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The model's own forward, with the ragged cache and attention swapped in."""
        cfg = self.model.config
        previous = cfg._attn_implementation
        cfg._attn_implementation = ATTN_NAME
        try:
            out = self.base(
                input_ids=ids, position_ids=pos, past_key_values=RaggedCache(batch), use_cache=True,
                attention_mask=torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=self.device),
                cache_position=torch.arange(batch.total, device=self.device), edgespec_batch=batch,
            )
        finally:
            cfg._attn_implementation = previous
        return out.last_hidden_state[0]

    def warm_up(self, pool: KVPool) -> None:
        """Runs a prompt chunk, a decoding step and a two-node tree through a scratch slot, so
        that a fresh server's first request does not pay what first use costs: numba compiles its
        typed list of a step's slots (~0.18 s), oneDNN creates the primitives of new shapes."""
        slot = pool.allocate(8)
        try:
            self.forward_rows([Row(slot, 0, [0, 1, 2, 3], [0, 1, 2, 3])])
            for tree in (TokenTree.root_only(4), TokenTree((4, 5), (-1, 0))):
                self.forward_rows([Row.for_tree(slot, 4, tree, greedy=True)])
        finally:
            pool.free(slot)

    def _next_token_scores(self, rows: list[Row], hidden: torch.Tensor) -> list[torch.Tensor]:
        """Per row: the logits at its logit_rows, or a greedy row's argmax tokens, computed for
        all greedy rows together (one screen) and all others together (one product)."""
        greedy = [r.start + i for r in rows if r.greedy for i in r.logit_rows]
        other = [r.start + i for r in rows if not r.greedy for i in r.logit_rows]
        scores = {True: self._greedy_tokens(hidden[greedy]) if greedy else torch.zeros(0, dtype=torch.long),
                  False: self._logits(hidden[other]) if other else hidden.new_zeros(0, self.vocab_size)}
        taken, per_row = {True: 0, False: 0}, []
        for r in rows:
            k = taken[r.greedy]
            per_row.append(scores[r.greedy][k:k + len(r.logit_rows)])
            taken[r.greedy] = k + len(r.logit_rows)
        return per_row

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(states).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _greedy_tokens(self, states: torch.Tensor) -> torch.Tensor:
        return self.screened_head(states) if self.screened_head else self._logits(states).argmax(dim=-1)

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
