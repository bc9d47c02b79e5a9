"""The prompt cache (edge_server.prompt_cache): which prefixes it keeps and gives back, that a
prompt fed from it holds bitwise the K/V a fresh prefill computes, and that it yields its memory
to new sessions."""
import asyncio
import json
import subprocess
import sys

import pytest
import torch

from device_client.drafters.none import NoDrafter
from device_client.session import Request, generate
from edge_server.kv_cache import KVBudgetError, KVPool
from edge_server.prompt_cache import PromptCache
from edge_server.sampling import Sampling
from edge_server.scheduler import Scheduler, SchedulerConfig
from edge_server.session import Session
from shared.protocol import pb
from shared.tree import TokenTree

from conftest import ROOT

CHUNK = 4


def _pool(budget=64):
    return KVPool(num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", budget_tokens=budget)


def _keep(cache, tokens, fed, prompt=None):
    """Keeps `tokens` from a session slot whose position p holds p, as its prefill (and steps,
    for a generation of a `prompt`-token prompt) would have left its K/V, and frees that slot as
    the session's end would."""
    slot = cache.pool.allocate(len(tokens) + 4)
    slot.storage[:] = torch.arange(slot.capacity, dtype=torch.float32)[:, None]
    cache.keep(tokens, slot, fed, prompt)
    cache.pool.free(slot)


def test_keeps_whole_chunks_and_gives_back_the_longest_shared_run():
    pool = _pool()
    cache = PromptCache(pool, CHUNK, budget_tokens=32)
    prompt = list(range(100, 111))  # 11 tokens: chunks 0-3, 4-7 whole, 8-10 partial
    _keep(cache, prompt, len(prompt))
    assert (cache.tokens, len(cache)) == (8, 1)

    def restored(ids):
        slot = pool.allocate(len(ids) + 1)
        n, wait = cache.restore(ids, slot, 0)
        assert not wait and slot.length == n
        assert torch.equal(slot.storage[0, 0, 0, :n, 0], torch.arange(n, dtype=torch.float32))
        pool.free(slot)
        return n

    assert restored(prompt[:6] + [7, 7, 7, 7]) == 4  # shares 6 tokens: one whole chunk
    assert restored(prompt + [1, 2]) == 8
    assert restored(prompt[:8]) == 4  # the prompt's last chunk is always fed: its logits start the answer
    assert restored(prompt[:3] + [0] * 8) == 0
    assert restored([5] + prompt[1:]) == 0


def test_a_longer_prefix_replaces_the_one_it_extends_and_old_entries_go_first():
    pool = _pool()
    cache = PromptCache(pool, CHUNK, budget_tokens=16)
    a, b = list(range(8)), list(range(50, 62))
    _keep(cache, a, 8)
    _keep(cache, a + [9] * 4, 12)  # extends a: a's entry goes
    assert (cache.tokens, len(cache)) == (12, 1)
    _keep(cache, a, 4)  # already inside the kept run: nothing new
    assert (cache.tokens, len(cache)) == (12, 1)
    _keep(cache, b, 12)  # 12 + 12 > 16: the least recently used entry goes
    assert (cache.tokens, len(cache)) == (12, 1)
    slot = pool.allocate(13)
    assert cache.restore(b + [1], slot, 0) == (12, False)
    assert cache.restore(a + [9] * 4 + [1], slot, 0) == (0, False)


def test_an_unfinished_generation_is_kept_whole_for_its_resumption_only():
    """Its prompt's partial chunk and its generated tokens' steps go to a resumption of it (the
    same prompt, then those tokens as steps); any other prompt gets its whole chunks."""
    pool = _pool(budget=120)
    cache = PromptCache(pool, CHUNK, budget_tokens=64)
    prompt, generated = list(range(100, 106)), list(range(500, 510))  # chunk 0-3 whole, 4-5 partial
    _keep(cache, prompt, 4)  # its prompt's whole chunk, kept when the prompt was in
    _keep(cache, prompt + generated, 15, prompt=6)  # released after 10 tokens (the last not in the KV)
    assert (cache.tokens, len(cache)) == (15, 1)  # it holds the prompt's whole chunk too

    def restored(ids, resumed=0):
        slot = pool.allocate(len(ids) + 1)
        n, wait = cache.restore(ids, slot, 0, resumed=resumed)
        assert not wait and torch.equal(slot.storage[0, 0, 0, :n, 0], torch.arange(n, dtype=torch.float32))
        pool.free(slot)
        return n

    assert restored(prompt + generated, resumed=10) == 15  # all but the last token, fed for its logits
    assert restored(prompt + generated[:4], resumed=4) == 9
    assert restored(prompt + generated + [7, 8], resumed=12) == 15  # it received more than was kept
    assert restored(prompt + generated[:3] + [1, 2], resumed=5) == 9
    assert restored(prompt[:5] + generated, resumed=10) == 4  # another prompt: whole chunks
    assert restored(prompt + generated) == 4  # the same tokens as a prompt: only the whole chunk fed as one
    assert restored(prompt) == 4  # the prompt alone: its partial chunk is fed as it was
    _keep(cache, prompt + generated[:6], 11, prompt=6)  # inside the kept run: nothing new
    _keep(cache, prompt + generated + [1, 2, 3], 18, prompt=6)  # broke again, later: replaces it
    assert (cache.tokens, len(cache)) == (18, 1)
    _keep(cache, prompt + generated + [1, 2, 3, 4, 5], 20)  # the same tokens as a prompt: its own entry
    assert (cache.tokens, len(cache)) == (38, 2) and restored(prompt + generated + [1, 2, 3, 4], resumed=14) == 18
    other = list(range(700, 706))
    _keep(cache, other + [5, 5], 8)  # a longer prompt's chunks hold other's partial chunk otherwise
    _keep(cache, other + [1], 6, prompt=6)  # gone after its first token: its prompt, partial chunk too
    assert len(cache) == 4 and restored(other + [1], resumed=1) == 6 and restored(other) == 4


def test_entries_make_room_for_sessions():
    pool = _pool(budget=40)
    cache = PromptCache(pool, CHUNK, budget_tokens=40)
    for start in (0, 100, 200):
        _keep(cache, list(range(start, start + 8)), 8)
    assert (cache.tokens, pool.free_tokens) == (24, 16)
    cache.make_room(30)
    assert (cache.tokens, pool.free_tokens) == (8, 32)  # the two oldest went, the newest stays
    assert cache.restore(list(range(200, 209)), pool.allocate(12), 0) == (8, False)


def test_a_prompt_takes_what_a_prompt_ahead_has_fed_and_waits_for_the_rest_they_share():
    pool = _pool()
    a, b = list(range(12)), list(range(10)) + [99, 98, 97]  # two whole chunks in common
    fed_a = pool.allocate(12)
    fed_a.storage[:] = torch.arange(12, dtype=torch.float32)[:, None]
    slot = pool.allocate(16)
    cache = PromptCache(pool, CHUNK, budget_tokens=32)
    assert cache.restore(b, slot, 0, [(a, fed_a, 4)]) == (4, True)  # a has fed one of them so far
    assert cache.restore(b, slot, 4, [(a, fed_a, 12)]) == (8, False)
    assert torch.equal(slot.storage[0, 0, 0, :8, 0], torch.arange(8, dtype=torch.float32))
    assert cache.restore(a[:8] + [5], slot, 0, [(a, fed_a, 12)]) == (8, False)
    assert PromptCache(pool, CHUNK, budget_tokens=0).restore(b, slot, 0, [(a, fed_a, 12)]) == (0, False)


def test_admission_drops_kept_prompts_before_it_refuses_a_session():
    pool = _pool(budget=100)
    sched = Scheduler(None, pool, SchedulerConfig(prefill_chunk=CHUNK, prompt_cache_mb=1), max_tree_nodes=8)
    try:
        _keep(sched.prompts, list(range(40)), 40)
        assert (sched.prompts.tokens, pool.free_tokens) == (40, 60)
        s = Session(list(range(100, 150)), Sampling(), max_new_tokens=4, stop_ids=frozenset(), want_hidden=False)
        sched.admit(s, 70)
        assert (sched.prompts.tokens, pool.free_tokens) == (0, 30)
        with pytest.raises(KVBudgetError, match="KV budget exhausted"):
            sched.admit(Session([1, 2], Sampling(), 4, frozenset(), False), 40)
    finally:
        sched.stop()


def _run(target, prompts, cache_mb, steps=6, together=False):
    """Feeds each prompt through a scheduler (chunks of 32), in turn or all at once, then decodes
    `steps` tokens; returns each session's prompt K/V (layer 0 and the last), tokens and cached
    prompt length, and the prompt tokens the scheduler's steps computed."""
    pool = KVPool.for_model(target.model, 256)
    sched = Scheduler(target, pool, SchedulerConfig(prefill_chunk=32, prompt_cache_mb=cache_mb), max_tree_nodes=8)
    out = []

    async def one(prompt):
        s = Session(prompt, Sampling(), max_new_tokens=steps, stop_ids=frozenset(), want_hidden=False)
        sched.admit(s, len(prompt) + steps + 8)
        await sched.prefill(s)
        while s.finish == pb.FINISH_NONE:
            await sched.verify(s, TokenTree.root_only(s.bonus))
        kv = s.slot.storage[[0, -1], :, :, :len(prompt)].clone()
        out.append((kv, s.generated, s.prompt_cached))
        sched.release(s)

    async def main():
        if together:
            await asyncio.gather(*map(one, prompts))
        else:
            for prompt in prompts:
                await one(prompt)

    try:
        asyncio.run(main())
    finally:
        sched.stop()
    return out, sched.metrics.snapshot()["window"]["prefill_tokens"]


def test_a_prompt_fed_from_the_cache_holds_what_a_fresh_prefill_computes(target, client):
    """The second prompt shares 75 tokens (two whole chunks) with the first: it restores 64
    positions and feeds the rest; its K/V at every prompt position and its tokens are bitwise
    those of the same prompt fed afresh, in fp32 and bf16."""
    tok = client[2]
    first = tok.chat_ids("Tell me about the history of the printing press, the steam engine and the telegraph "
                         "in Europe, and how each changed the way people worked and lived. " * 2)
    second = first[:75] + tok.chat_ids("Now something else: list three rivers.")
    ((_, _, none_cached), (kv, tokens, cached)), _ = _run(target, [first, second], cache_mb=64)
    [(fresh_kv, fresh_tokens, fresh_cached)], _ = _run(target, [second], cache_mb=0)
    assert (none_cached, cached, fresh_cached) == (0, 64, 0)
    assert torch.equal(kv.view(torch.uint8), fresh_kv.view(torch.uint8))
    assert tokens == fresh_tokens

    # both at once: the second waits for the first's two shared chunks instead of computing them
    out, computed = _run(target, [first, second], cache_mb=64, together=True)
    assert sorted(c for _, _, c in out) == [0, 64]
    assert computed == len(first) + len(second) - 64
    kv, tokens, _ = next(o for o in out if o[2] == 64)
    assert torch.equal(kv.view(torch.uint8), fresh_kv.view(torch.uint8)) and tokens == fresh_tokens


def test_a_prompt_waiting_for_one_that_ends_mid_prefill_feeds_the_rest_itself(target, client):
    """Two sessions send one prompt; the second waits for the first's chunks, the first is
    cancelled after a chunk or two, and the second takes what was fed, feeds the rest itself and
    still holds what a fresh prefill computes, with the same tokens."""
    prompt = client[2].chat_ids("Describe the printing press, the steam engine and the telegraph. " * 16)
    [(fresh_kv, fresh_tokens, _)], _ = _run(target, [prompt], cache_mb=0)
    pool = KVPool.for_model(target.model, 256)
    sched = Scheduler(target, pool, SchedulerConfig(prefill_chunk=32, prompt_cache_mb=64), max_tree_nodes=8)

    async def main():
        a, b = (Session(list(prompt), Sampling(), 6, frozenset(), False) for _ in range(2))
        for s in (a, b):
            sched.admit(s, len(prompt) + 16)
        first = asyncio.ensure_future(sched.prefill(a))
        await asyncio.sleep(0)  # a's prompt is queued first
        second = asyncio.ensure_future(sched.prefill(b))
        while a.prefilled < 32:
            await asyncio.sleep(0.005)
        sched.release(a)
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 120)  # not a wait for ever on a prompt nobody feeds
        while b.finish == pb.FINISH_NONE:
            await sched.verify(b, TokenTree.root_only(b.bonus))
        return b

    try:
        b = asyncio.run(main())
    finally:
        sched.stop()
    assert len(prompt) > 200 and 32 <= b.prompt_cached <= 96
    assert torch.equal(b.slot.storage[[0, -1], :, :, :len(prompt)].view(torch.uint8), fresh_kv.view(torch.uint8))
    assert b.generated == fresh_tokens


def test_server_reports_cached_prompt_tokens_and_stays_exact(client, served):
    """Over the real server (prompt chunks of 128): a second question on the same long notes
    reuses their whole chunks, says so in Started, and gives the target's own greedy output."""
    stub, info, tok = client
    notes = "Notes on rivers: " + " ".join(f"River {i} flows {i * 7 % 900} km to the sea." for i in range(30))
    ids = [tok.chat_ids(f"{notes}\n\nQuestion: {q}") for q in ("Which river is longest?", "Name two rivers.")]
    assert min(len(i) for i in ids) > 256
    recs = [generate(stub, Request(i, max_new_tokens=12), NoDrafter(), info.tokenizer_fingerprint) for i in ids]
    shared = next(k for k, (a, b) in enumerate(zip(*ids)) if a != b)
    assert recs[1].cached_prompt_tokens == shared // 128 * 128 > 0
    for i, rec in zip(ids, recs):
        assert rec.token_ids == served.greedy(i, 12)


def test_a_chat_resends_its_history_and_the_server_feeds_it_from_the_cache(server, served):
    """device-client --chat: the second turn's prompt begins with the first turn's, the server
    reports the first turn's whole chunks as cached, and both answers are the target's own."""
    notes = "Notes on lakes: " + " ".join(f"Lake {i} is {i * 13 % 700} m deep." for i in range(40))
    out = subprocess.run(
        [sys.executable, "-m", "device_client.cli", "--server", server.address, "--json", "--chat",
         "--drafter", "ngram", "--max-new-tokens", "8"],
        input=f"{notes} Which lake is deepest?\nAnd which is the shallowest?\n", cwd=ROOT,
        capture_output=True, text=True, timeout=300, check=True)
    first, second = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"text"')]
    ids = first["prompt_token_ids"]
    assert len(ids) > 256 and second["prompt_token_ids"][:len(ids)] == ids
    assert second["cached_prompt_tokens"] >= len(ids) // 128 * 128
    for turn in (first, second):
        assert turn["token_ids"] == served.greedy(turn["prompt_token_ids"], 8)
    assert "prompt tokens cached)" in out.stderr


def test_queued_prefill_counts_only_what_is_left_to_compute():
    """Backpressure counts the prompt tokens the server will compute: not those the cache holds,
    nor the chunks a prompt queued ahead will feed for the ones after it; a resumed generation's
    tokens count too."""
    from types import SimpleNamespace

    def session(ids, resumed=()):
        return Session(ids, Sampling(), 8, frozenset(), False, generated=list(resumed), resumed=len(resumed))

    pool = _pool(budget=200)
    sched = Scheduler(None, pool, SchedulerConfig(prefill_chunk=CHUNK, prompt_cache_mb=1), max_tree_nodes=8)
    try:
        doc, other = list(range(40)), list(range(100, 130))
        _keep(sched.prompts, doc + [1], 41)  # 40 positions kept
        assert sched.queued_prefill_tokens(session(doc + [7, 7])) == 2
        assert sched.queued_prefill_tokens(session(doc + [7, 7], resumed=[5, 6, 7])) == 5
        sched._pending = [SimpleNamespace(session=session(other + [k]), prefill=True, enqueued=float(k))
                          for k in (1, 2)]  # stand-ins: no model thread runs them
        assert sched.queued_prefill_tokens() == 31 + 3  # the second shares 28 positions with the first
        assert sched.queued_prefill_tokens(session(doc + [7, 7])) == 34 + 2
        assert sched.queued_prefill_tokens(session(other + [3])) == 34 + 3
    finally:
        sched._pending = []
        sched.stop()
