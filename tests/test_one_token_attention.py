"""The compiled one-token attention kernel: its conversions, its accuracy, and the property bf16
speculation rests on: a query's output is bitwise the same wherever and with whatever it is
computed (edge_server.one_token_attention)."""
import numpy as np
import pytest
import torch
from numba import njit

from edge_server import one_token_attention as ota
from edge_server.one_token_attention import BF16, FP16, OneTokenQueries

FORMATS = [(torch.bfloat16, BF16), (torch.float16, FP16)]
HEADS, KV_HEADS, DIM, LAYERS = 6, 2, 64, 2


@njit
def _widen_all(bits, fmt):
    out = np.empty((1, bits.shape[0]), np.float32)
    ota._widen(bits.reshape(1, -1), 0, out.view(np.uint32), 0, fmt)
    return out[0]


@njit
def _narrow_all(bits, fmt):
    out = np.empty(bits.shape[0], np.uint16)
    for i in range(bits.shape[0]):
        out[i] = ota._narrow_bf16(bits[i]) if fmt == BF16 else ota._narrow_fp16(bits[i])
    return out


@pytest.mark.parametrize("dtype, fmt", FORMATS)
def test_conversions_are_torchs(dtype, fmt):
    """Widening every 16-bit pattern, and rounding fp32 (random bits, the subnormal and overflow
    edges, infinities, NaN) gives the bits torch's own conversions give."""
    every = np.arange(1 << 16, dtype=np.uint16)
    ref = torch.from_numpy(every.view(np.int16).copy()).view(dtype).float().numpy()
    got = _widen_all(every, fmt)
    assert ((ref.view(np.uint32) == got.view(np.uint32)) | (np.isnan(ref) & np.isnan(got))).all()

    rng = np.random.default_rng(0)
    edges = [np.arange(0x33000000 - 3000, 0x38800000 + 3000, 97), np.arange(0x477FF000 - 3000, 0x477FF000 + 3000),
             [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F7FFFFF, 0x00000001]]
    wide = np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64), *map(np.asarray, edges)]).astype(np.uint32)
    ref = torch.from_numpy(wide.view(np.float32).copy()).to(dtype).view(torch.int16).numpy().view(np.uint16)
    got = _narrow_all(wide, fmt)
    nan = np.isnan(wide.view(np.float32))
    assert (ref[~nan] == got[~nan]).all()
    assert np.isnan(torch.from_numpy(got[nan].view(np.int16).copy()).view(dtype).float().numpy()).all()


def _slots(dtype, count=2, capacity=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYERS, 2, KV_HEADS, capacity, DIM, generator=g).to(dtype) for _ in range(count)]


def _attend(slots, groups, query, layer=1):
    """groups: (slot index, lo, hi, [each query's extra positions]); the queries are the query
    tensor's tokens in order. Returns the output [1, heads, T, dim]."""
    at, lo, hi, slot_of, extra_at, extra = [0], [], [], [], [0], []
    for s, a, b, extras in groups:
        for own in extras:
            extra.extend(own)
            extra_at.append(len(extra))
        at.append(at[-1] + len(extras))
        slot_of.append(s)
        lo.append(a)
        hi.append(b)
    ints = lambda v: np.asarray(v, dtype=np.int64)
    queries = OneTokenQueries(ints(range(at[-1])), ints(at), ints(slot_of), ints(lo), ints(hi), ints(extra_at),
                              ints(extra or [0]), ota.List([ota._bits(s) for s in slots]), ota.FORMATS[query.dtype])
    out = torch.empty_like(query)
    queries.attend(query, out, layer, DIM ** -0.5)
    return out


def _queries(dtype, n, seed=1):
    """[1, heads, n, dim], strided as the model's are (a transposed view)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, HEADS, DIM, generator=g).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype, fmt", FORMATS)
def test_attention_is_softmax_of_the_keys_it_sees(dtype, fmt):
    """Against float64 attention, grouped-query heads included: a decoding-step-like query over a
    run, and tree-like ones over a run plus positions after it."""
    slots = _slots(dtype)
    groups = [(0, 0, 151, [[]]), (1, 20, 300, [[300], [300, 302], [300, 302, 305]])]
    query = _queries(dtype, 4)
    out = _attend(slots, groups, query)
    keys = [list(range(151)), *[list(range(20, 300)) + e for e in groups[1][3]]]
    for t, (s, seen) in enumerate(zip([0, 1, 1, 1], keys)):
        for h in range(HEADS):
            kv = slots[s][1, :, h // (HEADS // KV_HEADS), seen].double()
            weights = torch.softmax(kv[0] @ query[0, h, t].double() * DIM ** -0.5, dim=0)
            ref = weights @ kv[1]
            torch.testing.assert_close(out[0, h, t].double(), ref, atol=4e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype, fmt", FORMATS)
@pytest.mark.parametrize("past", [0, 1, 15, 16, 17, 150, 511])
def test_a_query_is_bitwise_the_same_wherever_it_is_computed(dtype, fmt, past):
    """A tree node (the committed run, then its ancestors as extra positions) and the decoding
    step that later sees the same keys as one run give the same bits, and so does the node
    alone, with its siblings in a group, after other sessions' groups, or in another slot
    holding the same numbers."""
    slots = _slots(dtype)
    slots.append(slots[0].clone())
    path = [past, past + 1, past + 3]  # a node at depth 2 whose parent sits at tree index 1
    compact = slots[0].clone()  # the path committed: its nodes moved to past, past + 1, past + 2
    compact[:, :, :, past:past + 3] = slots[0][:, :, :, path]
    slots.append(compact)
    query = _queries(dtype, 1)
    node_alone = _attend(slots, [(0, 0, past, [path])], query)
    many = _queries(dtype, 6, seed=2)  # another session's decoding step, then five tree nodes
    many[0, :, 4] = query[0, :, 0]
    siblings = [[past], [past, past + 1], [past, past + 2], path, [past, past + 1, past + 4]]
    cases = {
        "decoding step": _attend(slots, [(3, 0, past + 3, [[]])], query)[0, :, 0],
        "with siblings": _attend(slots, [(1, 5, 40, [[]]), (0, 0, past, siblings)], many)[0, :, 4],
        "another slot": _attend(slots, [(2, 0, past, [path])], query)[0, :, 0],
    }
    for name, got in cases.items():
        assert torch.equal(got, node_alone[0, :, 0]), name
