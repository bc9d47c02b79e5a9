"""KV storage for batched verification: one preallocated slot per session, ragged attention.

Layout. Every session owns a slot: one tensor [layers, 2 (k/v), kv_heads, capacity, head_dim]
allocated once at admission, sized for its prompt + max_new_tokens + one tree. Position p of
the committed sequence lives at index p of the slot. A scheduler step is a *ragged* batch: the
new tokens of every row (a tree, a prefill chunk, a server-only decode step) are concatenated
into one sequence [1, T] so the linear layers (QKV, MLP, LM head: nearly all the FLOPs) run
once for the whole batch, without query padding. Attention then runs per row over that row's
own slot: a prompt chunk causally over the view `slot[layer, k|v, :, :past + n]`; on a CPU in
reduced precision, a decoding step and every tree node as a one-token query over exactly the
keys it sees, in sequence order, all of a step's in one call of a compiled kernel that reads
them where they lie (edge_server.one_token_attention: this makes a tree node's output bitwise
the decoding step's). Rows may sit in any slots (no compaction), and no step copies other
sessions' caches into a padded batch. The new keys of a row are written at its own offset;
committing an accepted path moves only the accepted nodes' K/V (a few positions) into place.

Memory is bounded: the pool admits a slot only while the reserved tokens fit the configured
budget, and says how much is free when it refuses.

Two callers. Llama-family models' steps call `write_rows` and `ragged_attention` directly
(edge_server.llama_rows). Other models run their own modules through the hook into transformers
(4.57): a `Cache` subclass whose `update()` scatters the step's new K/V into the slots, and the
same attention function registered in `ALL_ATTENTION_FUNCTIONS`, which the model uses only while
a batched forward runs (the config's attention implementation is switched for the call and
restored after). A tiny 4D dummy mask makes the model skip its own mask build.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from edge_server import one_token_attention
from edge_server.one_token_attention import OneTokenQueries

if TYPE_CHECKING:
    from shared.tree import TokenTree

ATTN_NAME = "edgespec_ragged"


class KVBudgetError(RuntimeError):
    """The KV budget cannot hold another slot of the asked size."""


class Slot:
    def __init__(self, pool: "KVPool", capacity: int):
        self.pool = pool
        self.capacity = capacity
        # uninitialised: every attention path reads only positions written before (a query's
        # own keys), so admission neither zeroes nor touches the pages a session never fills
        self.storage = torch.empty(pool.num_layers, 2, pool.kv_heads, capacity, pool.head_dim,
                                   dtype=pool.dtype, device=pool.device)
        self.length = 0  # committed positions
        self.freed = False

    def commit_path(self, past: int, path: list[int]) -> int:
        """Keeps positions [0, past) plus the tree nodes on `path` (indices into the tree written at
        `past`); moves only those nodes' K/V. Returns the new committed length."""
        n = len(path)
        if path != list(range(n)):  # identity prefix needs no move
            src = torch.tensor(path, device=self.storage.device) + past
            self.storage[:, :, :, past:past + n] = self.storage[:, :, :, src]
        self.length = past + n
        return self.length


class KVPool:
    """Admission-controlled slots under a token budget."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, budget_tokens: int):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.budget_tokens = budget_tokens
        self.used_tokens = 0
        self.slots = 0
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model, budget_mb: float) -> "KVPool":
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        p = next(model.parameters())
        per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * p.element_size()
        return cls(cfg.num_hidden_layers, kv_heads, head_dim, p.dtype, p.device,
                   int(budget_mb * 2**20 // per_token))

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def free_tokens(self) -> int:
        return self.budget_tokens - self.used_tokens

    def allocate(self, capacity: int) -> Slot:
        with self._lock:
            if capacity > self.free_tokens:
                self._refuse(capacity)
            self.used_tokens += capacity
            self.slots += 1
        try:
            return Slot(self, capacity)
        except RuntimeError as err:  # the device itself is out of memory
            with self._lock:
                self.used_tokens -= capacity
                self.slots -= 1
            raise KVBudgetError(f"cannot allocate a KV slot of {capacity} positions: {err}") from None

    def _refuse(self, capacity: int) -> None:
        mb = self.bytes_per_token / 2**20
        raise KVBudgetError(
            f"KV budget exhausted: this session needs {capacity} KV positions "
            f"({capacity * mb:.0f} MiB) but only {self.free_tokens} of {self.budget_tokens} are free "
            f"({self.slots} sessions hold the rest)")

    def free(self, slot: Slot) -> None:
        with self._lock:
            if slot.freed:
                return
            slot.freed = True
            self.used_tokens -= slot.capacity
            self.slots -= 1
        slot.storage = None  # the memory goes back now, not when the session object dies


@dataclass
class Row:
    """One row of a ragged step: `tokens` written at slot offset `past`, seeing slot[:past] fully
    and the row's own tokens through `visible` (bool [n, n]; None = causal)."""
    slot: Slot
    past: int
    tokens: list[int]
    positions: list[int]
    visible: np.ndarray | None = None
    logit_rows: list[int] = field(default_factory=list)  # rows (within this row) that need logits
    greedy: bool = False  # only the argmax of those logits is needed (TargetModel.forward_rows)
    # filled by the batch
    start: int = 0
    mask: torch.Tensor | None = None

    @classmethod
    def for_tree(cls, slot: Slot, past: int, tree: TokenTree, greedy: bool = False) -> "Row":
        """A tree verified after `past` committed positions, logits at every node (a one-node
        tree is a decoding step)."""
        return cls(slot, past, list(tree.tokens), [past + d for d in tree.depths],
                   tree.ancestor_mask() if len(tree) > 1 else None, list(range(len(tree))), greedy)

    @property
    def n(self) -> int:
        return len(self.tokens)


class RaggedBatch:
    def __init__(self, rows: list[Row], dtype: torch.dtype, device: torch.device):
        self.rows = rows
        self.dtype = dtype
        self.device = device
        self._exact = exact_one_token_queries(dtype, torch.device(device))
        start = 0
        for row in rows:
            row.start = start
            start += row.n
            # the fused kernel's mask: prompt chunks, and trees whose nodes are not computed one
            # by one (one query alone sees everything before it and needs none)
            row.mask = None if row.n == 1 or self.is_exact(row) else self._row_mask(row)[None, None].to(device)
        self.total = start
        self._queries: dict[int | None, OneTokenQueries | None] = {}
        self._slot_bits = None
        self._window_masks: dict[int, list[torch.Tensor | None]] = {}

    def is_exact(self, row: Row) -> bool:
        """Whether the row's queries are one-token queries computed exactly (decoding steps, tree
        nodes; see exact_one_token_queries)."""
        return self._exact and (row.n == 1 or row.visible is not None)

    def queries(self, window: int | None = None) -> OneTokenQueries | None:
        """Every exact row's one-token queries, for full-attention layers or for local ones that
        see `window` positions (None without such rows)."""
        if window not in self._queries:
            rows = [row for row in self.rows if self.is_exact(row)]
            if rows and self._slot_bits is None:
                self._slot_bits = OneTokenQueries.slot_bits(rows)
            self._queries[window] = OneTokenQueries.of(rows, self._slot_bits, self.dtype, window) if rows else None
        return self._queries[window]

    def _row_mask(self, row: Row) -> torch.Tensor:
        """[n, past + n] additive: the committed prefix, then causal (a chunk) or the tree's
        ancestors among the row's own tokens."""
        own = torch.ones(row.n, row.n, dtype=torch.bool).tril_() if row.visible is None else torch.from_numpy(row.visible)
        mask = torch.zeros(row.n, row.past + row.n, dtype=self.dtype)
        mask[:, row.past:].masked_fill_(~own, torch.finfo(self.dtype).min)
        return mask

    def window_masks(self, window: int) -> list[torch.Tensor | None]:
        """Row masks with a sliding window on top (models with local-attention layers), for the
        rows the fused kernel computes."""
        if window not in self._window_masks:
            out: list[torch.Tensor | None] = []
            for row in self.rows:
                if self.is_exact(row):
                    out.append(None)
                    continue
                kpos = torch.cat([torch.arange(row.past), torch.tensor(row.positions)])
                qpos = torch.tensor(row.positions)
                far = (qpos[:, None] - kpos[None, :]) >= window
                base = self._row_mask(row).masked_fill_(far, torch.finfo(self.dtype).min)
                out.append(base[None, None].to(self.device))
            self._window_masks[window] = out
        return self._window_masks[window]


class RaggedCache(Cache):
    """Writes each row's new K/V into its slot; attention reads the slots (see ragged_attention)."""

    is_compileable = False

    def __init__(self, batch: RaggedBatch):
        super().__init__(layers=[])
        self.batch = batch

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        write_rows(self.batch, layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, cache_position, layer_idx: int = 0):
        return int(cache_position.shape[0]), 0


def write_rows(batch: RaggedBatch, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Each row's new K/V ([1, kv_heads, T, head_dim]) into its slot at its offset. K and V are
    stacked once, then one copy per row: PyTorch's per-copy overhead (~20 us here) was ~5 ms of
    an 8-row step's 30 layers with a copy each for K and V."""
    new = torch.stack([keys[0], values[0]])  # [2, kv_heads, T, head_dim]
    for row in batch.rows:
        row.slot.storage[layer][:, :, row.past:row.past + row.n] = new[:, :, row.start:row.start + row.n]


def exact_one_token_queries(dtype: torch.dtype, device: torch.device) -> bool:
    """Where a tree node's output is made bitwise a decoding step's: in reduced precision on CPU,
    whose products of 4+ rows are batch-invariant and every product is padded to 4 rows
    (edge_server.verifier.fit_cpu_products), and whose one-token attention is our own kernel. In
    fp32 the fused masked kernel is used: on several threads a decoding step keeps the faster
    one-row product, so tree and step differ by ~1e-6 anyway. On CUDA the library picks
    kernels by shape, so nothing is claimed there."""
    return device.type == "cpu" and dtype in one_token_attention.FORMATS


def ragged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     sliding_window=None, **kwargs):
    """Per-row attention over each row's own slot view; query is [1, heads, T, head_dim]."""
    batch: RaggedBatch = kwargs["edgespec_batch"]
    layer = module.layer_idx
    gqa = query.shape[1] != key.shape[1]
    masks = batch.window_masks(sliding_window) if sliding_window else [r.mask for r in batch.rows]
    out = torch.empty_like(query)
    for row, mask in zip(batch.rows, masks):
        if batch.is_exact(row):
            continue
        store = row.slot.storage[layer]
        end = row.past + row.n
        k = store[0, :, :end].unsqueeze(0)
        v = store[1, :, :end].unsqueeze(0)
        q = query[:, :, row.start:row.start + row.n]
        out[:, :, row.start:row.start + row.n] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    queries = batch.queries(sliding_window)
    if queries is not None:
        queries.attend(query, out, layer, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, ragged_attention)
