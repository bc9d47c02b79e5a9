"""Exact one-token attention on CPU: one compiled kernel for every decoding step and tree node.

Why a kernel of our own: bf16 verification is lossless only if a tree node's output is bitwise
the decoding step's at the same place (a tree verified in one wide bf16 step flipped the
target's greedy choice in 7 of 34 64-token generations). PyTorch's kernels sum in an order that
depends on the shapes they are given, so the server used to copy each query's keys, in sequence
order and padded to a multiple of 64, into an fp32 batch of its own and run plain products on
it: ~10 PyTorch calls a layer and a copy of every query's whole prefix, 22-37% of a 4-session
step at 150 positions (SmolLM2-135M, bf16, one thread). Here each query reads its keys where they
lie in its slot and sums them in one fixed order, so its output depends on nothing but the query
and the keys it sees, whatever else shares the call: a decoding step and a tree node agree
bitwise by construction, with no copies and one call a layer (4 sessions' 1 / 2 / 4-node trees
at 150 positions: attention 5.3 / 7.3 / 11.3 ms of 35 / 42 / 56 ms steps).

Numbers are widened to fp32 on load (bf16 and fp16 exactly, by their bits), products and the
softmax run in fp32, and the output is rounded to nearest-even on store, as a tensor's
`.to(bfloat16)` / `.to(float16)` would.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit, types
from numba.typed import List

if TYPE_CHECKING:
    from edge_server.kv_cache import Row

# which 16-bit format the tensors hold
BF16, FP16 = 0, 1

_BF16_QNAN = 0x7FC0
_FP16_QNAN = 0x7E00


@njit(cache=True, inline="always")
def _widen(bits: np.ndarray, i: int, wide: np.ndarray, j: int, fmt: int) -> None:
    """Row i of 16-bit floats (their bits, uint16) into row j of `wide` (fp32 bits, uint32),
    exactly. Rows go by index, not as views: a view a key cost two atomic reference counts, 15%
    of a call."""
    if fmt == BF16:
        for c in range(bits.shape[1]):
            wide[j, c] = np.uint32(bits[i, c]) << 16
    else:
        for c in range(bits.shape[1]):
            wide[j, c] = _fp16_to_fp32_bits(np.uint32(bits[i, c]))


@njit(cache=True, inline="always")
def _fp16_to_fp32_bits(h: int) -> int:
    """By hand: numba has no float16 on CPU (NotImplementedError, 0.68). Bit arithmetic in int64
    throughout: numba types a mix of unsigned and signed as float."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0x1F:  # inf, nan
        return sign | 0x7F800000 | (man << 13)
    if exp == 0:
        if man == 0:
            return sign
        e = 113  # 127 - 15 + 1: normalise the subnormal
        while (man & 0x400) == 0:
            man <<= 1
            e -= 1
        return sign | (e << 23) | ((man & 0x3FF) << 13)
    return sign | ((exp + 112) << 23) | (man << 13)


@njit(cache=True, inline="always")
def _narrow_bf16(u: int) -> int:
    u = np.int64(u)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return _BF16_QNAN | ((u >> 16) & 0x8000)
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@njit(cache=True, inline="always")
def _narrow_fp16(u: int) -> int:
    """fp32 bits to fp16 bits, round to nearest even (overflow to inf, underflow to subnormals
    and zero)."""
    u = np.int64(u)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | _FP16_QNAN
    if a >= 0x477FF000:  # rounds to 65520 or more: inf
        return sign | 0x7C00
    if a < 0x38800000:  # below the smallest normal fp16 (2^-14): a subnormal
        if a < 0x33000000:  # below half the smallest subnormal: zero
            return sign
        man = (a & 0x7FFFFF) | 0x800000
        shift = 126 - (a >> 23)  # the value is man * 2^(exp - 150), a subnormal's unit 2^-24
        half = np.int64(1) << (shift - 1)
        rest = man & ((np.int64(1) << shift) - 1)
        out = man >> shift
        if rest > half or (rest == half and (out & 1) == 1):
            out += 1
        return sign | out
    return sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13)


@njit(cache=True, inline="always")
def _exp_shifted(x, top, powers) -> None:
    """x[j] = exp(x[j] - top) for x <= top, in loops the compiler can vectorize (a call to the C
    library's expf cannot be): 2^k by its bits, e^r by a degree-6 polynomial on |r| <= ln2/2
    (relative error ~2e-7); below e^-87, the smallest normal fp32, it returns e^-87."""
    for j in range(x.shape[0]):
        v = max(x[j] - top, np.float32(-87.0))
        k = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
        r = v - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
        p = np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        x[j] = p * r + np.float32(1.0)
        powers[j] = (np.int32(k) + np.int32(127)) << 23
    scales = powers.view(np.float32)
    for j in range(x.shape[0]):
        x[j] *= scales[j]


@njit(cache=True, inline="always")
def _largest(x, lanes):
    """max(x), sixteen lanes at a time so that the compiler vectorizes it (a running maximum is
    one long chain). The largest of a set is the same whatever order finds it."""
    lanes[:] = x[0]
    for j in range(0, x.shape[0] - 15, 16):
        for l in range(16):
            lanes[l] = max(lanes[l], x[j + l])
    top = lanes[0]
    for l in range(1, 16):
        top = max(top, lanes[l])
    for j in range(x.shape[0] - x.shape[0] % 16, x.shape[0]):
        top = max(top, x[j])
    return top


@njit(cache=True, inline="always")
def _key(t, run, lo, first, last, extra_at, extra, owner):
    """A group's key t in the order the kernel takes them: the run's keys (seen by every query of
    the group), then each query's own keys in turn. Returns the key's slot position, the
    group-relative queries that see it (qa..qb-1), its column in their weights, and where the
    next lookup of an owner starts."""
    if t < run:
        return lo + t, 0, last - first, t, owner
    e = extra_at[first] + t - run
    while e >= extra_at[first + owner + 1]:
        owner += 1
    return extra[e], owner, owner + 1, run + e - extra_at[first + owner], owner


@njit(cache=True, nogil=True)
def _weighted_values(values, lo, run, first, last, extra_at, extra, weights, rows, acc, fmt):
    """acc[n, g] = the sum over query n's value rows, in its keys' order, of weights[n, g, j] *
    row j. No fast-math here: each channel's sum runs strictly left to right, so the run's rows
    go four at a time (a quarter of the loads and stores of `acc`) and the rest one at a time
    with the same result. values: the layer's [positions, head_dim] bits of one kv head; rows:
    [4, head_dim] fp32 scratch."""
    queries, per_kv, dim = last - first, acc.shape[1], acc.shape[2]
    wide = rows.view(np.uint32)
    acc[:queries] = 0.0
    j = 0
    while j + 4 <= run:
        for b in range(4):
            _widen(values, lo + j + b, wide, b, fmt)
        for n in range(queries):
            for g in range(per_kv):
                w0, w1, w2, w3 = weights[n, g, j], weights[n, g, j + 1], weights[n, g, j + 2], weights[n, g, j + 3]
                for c in range(dim):
                    acc[n, g, c] = (((acc[n, g, c] + w0 * rows[0, c]) + w1 * rows[1, c]) + w2 * rows[2, c]) + w3 * rows[3, c]
        j += 4
    owner = 0
    for t in range(j, run + extra_at[last] - extra_at[first]):
        pos, qa, qb, col, owner = _key(t, run, lo, first, last, extra_at, extra, owner)
        _widen(values, pos, wide, 0, fmt)
        for n in range(qa, qb):
            for g in range(per_kv):
                w = weights[n, g, col]
                for c in range(dim):
                    acc[n, g, c] = acc[n, g, c] + w * rows[0, c]


# one compiled signature, loaded from numba's cache or compiled (~4 s) at import: a query is a
# strided view of the model's tensor, and a new layout mid-serving would stall a step to compile
_INDEX = types.int64[::1]
_SIGNATURE = types.void(types.uint16[:, :, :], types.uint16[:, :, :], types.ListType(types.uint16[:, :, :, :, ::1]),
                        types.int64, _INDEX, _INDEX, _INDEX, _INDEX, _INDEX, _INDEX, _INDEX, types.float32,
                        types.int64)


@njit(_SIGNATURE, cache=True, fastmath={"reassoc"}, nogil=True)
def _attend(query, out, slots, layer, tokens, group_at, group_slot, group_lo, group_hi, extra_at, extra,
            scale, fmt):
    """For each group of one-token queries (`tokens[group_at[k]:group_at[k+1]]`, all of one slot
    and seeing the same run of its positions group_lo[k]..group_hi[k]-1 first, then each its own
    `extra[extra_at[i]:extra_at[i+1]]`): out[head, token] = the attention of query[head, token]
    over those keys, in that order. query/out: 16-bit bits [heads, T, head_dim]; a slot:
    [layers, 2, kv_heads, capacity, head_dim]. Grouped-query: head h reads kv head h // (heads /
    kv_heads).

    Why it is bitwise the same for a query wherever it is computed: each reduction (a score's
    dot product, the softmax's max and sum, a value row's weighted sum) is written once, runs
    over the query's own keys in sequence order, and the code the compiler made of it depends
    only on the head dimension and the number of keys. A group shares its keys' loads and
    conversions, never a sum: each key or value row is widened once into a row of scratch and
    every query head of the group that sees it takes it in turn."""
    heads, _, dim = query.shape
    kv_heads = slots[0].shape[2]
    per_kv = heads // kv_heads
    most_keys, most_queries = 1, 1
    for k in range(group_at.shape[0] - 1):
        first, last = group_at[k], group_at[k + 1]
        most_queries = max(most_queries, last - first)
        for i in range(first, last):
            most_keys = max(most_keys, group_hi[k] - group_lo[k] + extra_at[i + 1] - extra_at[i])
    rows = np.empty((4, dim), np.float32)
    wide = rows.view(np.uint32)
    q = np.empty((most_queries * per_kv, dim), np.float32)
    q_wide = q.view(np.uint32)
    weights = np.empty((most_queries, per_kv, most_keys), np.float32)
    lanes = np.empty(16, np.float32)
    acc = np.empty((most_queries, per_kv, dim), np.float32)
    acc_bits = acc.view(np.uint32)
    powers = np.empty(most_keys, np.int32)
    for k in range(group_at.shape[0] - 1):
        store, lo, run = slots[group_slot[k]], group_lo[k], group_hi[k] - group_lo[k]
        first, last = group_at[k], group_at[k + 1]
        for kv in range(kv_heads):
            for n in range(last - first):
                for g in range(per_kv):
                    _widen(query[kv * per_kv + g], tokens[first + n], q_wide, n * per_kv + g, fmt)
            keys, owner = store[layer, 0, kv], 0
            for t in range(run + extra_at[last] - extra_at[first]):
                pos, qa, qb, col, owner = _key(t, run, lo, first, last, extra_at, extra, owner)
                _widen(keys, pos, wide, 0, fmt)
                for n in range(qa, qb):  # every query head of the group that sees this key
                    for g in range(per_kv):
                        s = np.float32(0.0)
                        for c in range(dim):
                            s += q[n * per_kv + g, c] * rows[0, c]
                        weights[n, g, col] = s * scale
            for n in range(last - first):
                length = run + extra_at[first + n + 1] - extra_at[first + n]
                for g in range(per_kv):
                    _exp_shifted(weights[n, g, :length], _largest(weights[n, g, :length], lanes), powers[:length])
                    total = np.float32(0.0)
                    for j in range(length):
                        total += weights[n, g, j]
                    inv = np.float32(1.0) / total
                    for j in range(length):
                        weights[n, g, j] *= inv
            _weighted_values(store[layer, 1, kv], lo, run, first, last, extra_at, extra, weights, rows, acc, fmt)
            for n in range(last - first):
                for g in range(per_kv):
                    h, i = kv * per_kv + g, tokens[first + n]
                    for c in range(dim):
                        out[h, i, c] = _narrow_bf16(acc_bits[n, g, c]) if fmt == BF16 else _narrow_fp16(acc_bits[n, g, c])


# the dtypes the kernel reads (in CPU memory; see edge_server.kv_cache.exact_one_token_queries)
FORMATS = {torch.bfloat16: BF16, torch.float16: FP16}


def _bits(t: torch.Tensor) -> np.ndarray:
    """A 16-bit float tensor's memory as a uint16 array (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


@dataclass
class OneTokenQueries:
    """A step's one-token queries (decoding steps and tree nodes) and the keys each sees, for
    one kind of layer (full attention, or a sliding window), grouped by row: a row's queries
    that see the same run of committed positions share its loads (_attend)."""
    tokens: np.ndarray  # each query's index in the step's token sequence
    group_at: np.ndarray  # group k: queries group_at[k]..group_at[k+1]-1
    group_slot: np.ndarray  # group k's slot, an index into `slots`
    group_lo: np.ndarray  # group k's queries see slot positions group_lo[k]..group_hi[k]-1 first,
    group_hi: np.ndarray
    extra_at: np.ndarray  # then query i sees extra[extra_at[i]:extra_at[i+1]] (its tree path)
    extra: np.ndarray
    slots: List
    fmt: int

    @classmethod
    def of(cls, rows: Sequence[Row], slots: List, dtype: torch.dtype, window: int | None = None
           ) -> "OneTokenQueries":
        """`rows`: the step's exact rows (decoding steps and trees), `slots` their slots' bits in
        the same order. A decoding step sees its slot's positions up to its own; a tree node the
        committed prefix, then its ancestors and itself (slot index order, which is depth order
        along a path: the order a decoding step sees the same tokens in once they are
        committed). A local layer keeps the keys within `window` positions of the query."""
        tokens, extra_at, extra = [], [0], []
        group_at, group_slot, group_lo, group_hi = [0], [], [], []
        for r, row in enumerate(rows):
            by_lo: dict[int, list[int]] = {}
            for j, pos in enumerate(row.positions):
                by_lo.setdefault(0 if window is None else max(0, pos - window + 1), []).append(j)
            depths = np.asarray(row.positions) - row.past
            hi = row.past + 1 if row.visible is None else row.past  # a decoding step's run ends at itself
            for lo, nodes in by_lo.items():
                for j in nodes:
                    tokens.append(row.start + j)
                    if row.visible is not None:
                        own = np.flatnonzero(row.visible[j])
                        if window is not None:
                            own = own[row.positions[j] - row.past - depths[own] < window]
                        extra.extend((row.past + own).tolist())
                    extra_at.append(len(extra))
                group_at.append(len(tokens))
                group_slot.append(r)
                group_lo.append(min(lo, hi))
                group_hi.append(hi)
        ints = lambda v: np.asarray(v, dtype=np.int64)
        return cls(ints(tokens), ints(group_at), ints(group_slot), ints(group_lo), ints(group_hi),
                   ints(extra_at), ints(extra or [0]), slots, FORMATS[dtype])

    @staticmethod
    def slot_bits(rows: Sequence[Row]) -> List:
        return List([_bits(row.slot.storage) for row in rows])

    def attend(self, query: torch.Tensor, out: torch.Tensor, layer: int, scale: float) -> None:
        """Writes the queries' attention into `out`; both [1, heads, T, head_dim]."""
        _attend(_bits(query[0]), _bits(out[0]), self.slots, layer, self.tokens, self.group_at,
                self.group_slot, self.group_lo, self.group_hi, self.extra_at, self.extra,
                np.float32(scale), self.fmt)
