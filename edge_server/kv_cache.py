"""KV storage for batched verification: one preallocated slot per session, ragged attention.

Layout. Every session owns a slot: one tensor [layers, 2 (k/v), kv_heads, capacity, head_dim]
allocated once at admission, sized for its prompt + max_new_tokens + one tree. Position p of
the committed sequence lives at index p of the slot. A scheduler step is a *ragged* batch: the
new tokens of every row (a tree, a prefill chunk, a server-only decode step) are concatenated
into one sequence [1, T] so the linear layers (QKV, MLP, LM head: nearly all the FLOPs) run
once for the whole batch, without query padding. Attention then runs per row over that row's
own slot: a prompt chunk causally over the view `slot[layer, k|v, :, :past + n]`; a decoding
step and every tree node as a one-token query over exactly the keys it sees, in sequence order,
padded to a multiple of ATTN_BUCKET (see _query_groups: this makes a tree node's output
bitwise the decoding step's), in products shared by up to QUERY_BATCH such queries of any rows
(QueryBatch). A decoding step copies its slot's prefix; a tree copies the committed prefix
once for all its nodes (QueryGroup.shared) and gathers each node's path (copies of its own
session's keys, node by node, which the exactness costs: measured in bf16, 1 thread, before
the shared copy, a step of 4 sessions' 4-node trees at 600 committed positions cost 2.0x
their decoding step, at 150 positions 1.5x; the shared copy made trees' steps at 600
positions 0.83-0.94x, at 150 0.96-1.0x). Sharing the prefix's products (not only its copy)
between a tree's nodes while staying bitwise (values summed in fixed blocks, products padded
to 4 rows) was tried: it made decoding steps 30-70% dearer per layer at 300-600 positions
through PyTorch's per-op overhead, so it waits for a fused kernel. Rows may sit
in any slots (no compaction), and no step copies other sessions' caches into a padded batch.
The new keys of a row are written at its own offset; committing an accepted path moves only
the accepted nodes' K/V (a few positions) into place.

Memory is bounded: the pool admits a slot only while the reserved tokens fit the configured
budget, and says how much is free when it refuses.

The hook into transformers (4.57): a `Cache` subclass whose `update()` scatters the step's new
K/V into the slots, and an attention function registered in `ALL_ATTENTION_FUNCTIONS` that the
model uses only while a batched forward runs (the config's attention implementation is switched
for the call and restored after). A tiny 4D dummy mask makes the model skip its own mask build.
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

if TYPE_CHECKING:
    from shared.tree import TokenTree

ATTN_NAME = "edgespec_ragged"
ATTN_BUCKET = 64  # one-token queries see their keys padded to a multiple of this, masked (_query_groups)
# most one-token queries attended together (their fp32 keys and values copied side by side).
# bf16, one thread, paired steps against one query group at a time: at 150 positions 8 sessions'
# decoding steps 0.83x, their 2 / 4 / 8-node trees 0.89 / 0.94 / 0.99x with 8 (16: 0.83 / 0.90
# / 0.97 / 1.02x, all at once: 1.08-1.14x for the larger trees); at 600 positions 0.89x for
# decoding, 0.95-1.04x for trees
QUERY_BATCH = 8


class KVBudgetError(RuntimeError):
    """The KV budget cannot hold another slot of the asked size."""


def _bucketed(length: int) -> int:
    return -(-length // ATTN_BUCKET) * ATTN_BUCKET


class Slot:
    def __init__(self, pool: "KVPool", capacity: int):
        self.pool = pool
        self.capacity = capacity
        # whole attention buckets, zeroed: a query's padding keys are read (and masked), so they
        # must hold finite numbers
        self.storage = torch.zeros(pool.num_layers, 2, pool.kv_heads, _bucketed(capacity), pool.head_dim,
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
        capacity = _bucketed(capacity)
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
        self._queries: dict[int | None, list[QueryBatch]] = {}
        self._window_masks: dict[int, list[torch.Tensor | None]] = {}

    def is_exact(self, row: Row) -> bool:
        """Whether the row's queries are one-token queries computed exactly (decoding steps, tree
        nodes; see exact_one_token_queries)."""
        return self._exact and (row.n == 1 or row.visible is not None)

    def queries(self, window: int | None = None) -> list[QueryBatch]:
        """Every exact row's one-token queries, batched across rows by the (padded) number of
        keys they see, for full-attention layers or for local ones that see `window` positions."""
        if window not in self._queries:
            by_length: dict[int, list[tuple[Row, QueryGroup]]] = {}
            for row in self.rows:
                if self.is_exact(row):
                    for group in _query_groups(row, self.device, window):
                        by_length.setdefault(group.length, []).append((row, group))
            self._queries[window] = [QueryBatch.of(chunk) for parts in by_length.values()
                                     for chunk in _chunks(parts, QUERY_BATCH)]
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
        # K and V stacked once, then one copy per row: PyTorch's per-copy overhead (~20 us here)
        # was ~5 ms of an 8-row step's 30 layers with a copy each for K and V
        new = torch.stack([key_states[0], value_states[0]])  # [2, kv_heads, T, head_dim]
        for row in self.batch.rows:
            row.slot.storage[layer_idx][:, :, row.past:row.past + row.n] = new[:, :, row.start:row.start + row.n]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, cache_position, layer_idx: int = 0):
        return int(cache_position.shape[0]), 0


@dataclass
class QueryGroup:
    """One-token queries of a row that see the same number of (padded) keys: decoding steps and
    tree nodes. `keys` None: the slot's first `length` positions (a decoding step that sees the
    slot from its start); else every query sees the slot's first `shared` positions (a tree's
    committed prefix and root, copied once for all its nodes), then the slot positions in
    `keys` [queries, length - shared]: the rest of its keys (its root path; in a local layer
    all of them, within the window), then padding."""
    nodes: torch.Tensor  # the queries' indices within the row
    keys: torch.Tensor | None
    mask: torch.Tensor  # [queries, 1, length] float32: 0 for real keys, -inf for the padding
    shared: int = 0

    @property
    def length(self) -> int:
        return self.mask.shape[-1]


@dataclass
class QueryBatch:
    """One-token queries of any rows that see the same number of (padded) keys, attended in one
    batch of products: each query is still its own batch entry of the same shape, so its result
    does not depend on which rows share the step (one set of products per key length per layer
    instead of one per row: PyTorch's ~10 us per op were most of a batched step's attention)."""
    parts: list[tuple[Row, QueryGroup]]
    tokens: torch.Tensor  # [n] the queries' indices in the step's token sequence
    mask: torch.Tensor  # [n, 1, length]

    @classmethod
    def of(cls, parts: list[tuple[Row, QueryGroup]]) -> "QueryBatch":
        tokens = torch.cat([row.start + group.nodes for row, group in parts])
        return cls(parts, tokens, torch.cat([group.mask for _, group in parts]))


def exact_one_token_queries(dtype: torch.dtype, device: torch.device) -> bool:
    """Where a tree node's output can be made bitwise a decoding step's: in reduced precision on
    CPU, whose products of 4+ rows are batch-invariant and every product is padded to 4 rows
    (edge_server.verifier.fit_cpu_products). In fp32 the fused masked kernel is used: on
    several threads a decoding step keeps the faster one-row product, so tree and step differ
    by ~1e-6 anyway; on one thread the products are batch-invariant, but gathering every
    node's keys would cost more than the products saved. On CUDA the library picks kernels by
    shape, so nothing is claimed there."""
    return device.type == "cpu" and dtype != torch.float32


def _query_groups(row: Row, device: torch.device, window: int | None = None) -> list[QueryGroup]:
    """Why every one-token query is computed the same way: a decoding step and a tree node at the
    same place on the same path must give bitwise the same output, or the target's greedy
    choice flips now and then (measured: 7 of 34 bf16 64-token generations). Attention kernels
    sum keys in an order that depends on how many keys they see and where the masked ones sit,
    so each query attends once, to exactly its keys in sequence order, padded at the end to a
    multiple of ATTN_BUCKET and masked there: the kernel then takes the same path for the
    same query wherever it is computed, alone or with other queries of any length. In a local
    (sliding-window) layer a query's keys are those within `window` positions of it."""
    if row.visible is None:  # a decoding step: its keys are the slot's first past + 1 positions
        seen = [np.arange(row.past + 1)]
    else:
        seen = [np.concatenate([np.arange(row.past), row.past + np.flatnonzero(v)]) for v in row.visible]
    if window is not None:
        key_pos = np.concatenate([np.arange(row.past), np.asarray(row.positions)])  # slot index -> position
        seen = [keys[key_pos[keys] > pos - window] for keys, pos in zip(seen, row.positions)]
    from_start = row.visible is None and seen[0][0] == 0  # a decoding step that sees the slot from 0
    by_length: dict[int, list[int]] = {}
    for j, keys in enumerate(seen):
        by_length.setdefault(_bucketed(len(keys)), []).append(j)
    groups = []
    for length, nodes in by_length.items():
        mask = torch.zeros(len(nodes), 1, length)
        for i, j in enumerate(nodes):
            mask[i, ..., len(seen[j]):] = -torch.inf
        keys, shared = None, 0
        if not from_start:  # the keys past the shared prefix, padded with position 0 (masked)
            shared = min(_leading_run(seen[j]) for j in nodes)
            rest = np.zeros((len(nodes), length - shared), dtype=np.int64)
            for i, j in enumerate(nodes):
                rest[i, :len(seen[j]) - shared] = seen[j][shared:]
            keys = torch.from_numpy(rest).to(device)
        groups.append(QueryGroup(torch.tensor(nodes, device=device), keys, mask.to(device), shared))
    return groups


def _leading_run(keys: np.ndarray) -> int:
    """How many of the first keys are the slot's positions 0, 1, 2, ..."""
    same = keys == np.arange(len(keys))
    return len(keys) if same.all() else int(np.argmin(same))


def _chunks(parts: list[tuple[Row, QueryGroup]], most: int) -> list[list[tuple[Row, QueryGroup]]]:
    """Consecutive parts with at most `most` queries in all (a larger part alone)."""
    chunks: list[list[tuple[Row, QueryGroup]]] = [[]]
    count = 0
    for part in parts:
        if chunks[-1] and count + len(part[1].nodes) > most:
            chunks.append([])
            count = 0
        chunks[-1].append(part)
        count += len(part[1].nodes)
    return chunks


def _one_token_attention(query: torch.Tensor, out: torch.Tensor, batch: QueryBatch, layer: int,
                         scaling) -> None:
    """Writes the batch's queries' attention into `out` (both [1, heads, T, head_dim]); see
    _query_groups. Plain fp32 matrix products, one query per batch entry: their result for a
    query does not depend on the batch (checked bitwise), and in bf16 they run 3-4x faster here
    than the fused kernel, which is slow for one-token queries on this CPU (0.36 vs 0.13 ms a
    decoding step's layer)."""
    n, length = len(batch.tokens), batch.mask.shape[-1]
    store = batch.parts[0][0].slot.storage[layer]
    kv_heads, head_dim = store.shape[1], store.shape[3]
    # the same contiguous fp32 layout for every query: a product's kernel follows the layout
    kv = torch.empty(2, kv_heads, n, length, head_dim, dtype=torch.float32, device=query.device)
    at = 0
    for row, group in batch.parts:
        store = row.slot.storage[layer]
        count = len(group.nodes)
        if group.keys is None:  # a decoding step: the slot's prefix as it is
            kv[:, :, at].copy_(store[:, :, :length])
        else:  # the shared prefix copied to every query at once, the rest gathered per query
            shared, rest = group.shared, length - group.shared
            kv[:, :, at:at + count, :shared].copy_(store[:, :, :shared].unsqueeze(2))
            taken = store.reshape(2 * kv_heads, store.shape[2], head_dim).index_select(1, group.keys.reshape(-1))
            kv[:, :, at:at + count, shared:].copy_(taken.view(2, kv_heads, count, rest, head_dim))
        at += count
    scale = scaling if scaling is not None else head_dim ** -0.5  # as the fused kernel's default
    q = query[0][:, batch.tokens].reshape(kv_heads, -1, n, head_dim).transpose(1, 2).float()  # [kv, n, group, d]
    scores = torch.matmul(q, kv[0].transpose(-1, -2)) * scale + batch.mask
    o = torch.matmul(torch.softmax(scores, dim=-1), kv[1])  # [kv, n, group, d]
    out[0][:, batch.tokens] = o.transpose(1, 2).reshape(-1, n, head_dim).to(query.dtype)


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
    for queries in batch.queries(sliding_window):
        _one_token_attention(query, out, queries, layer, scaling)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, ragged_attention)
