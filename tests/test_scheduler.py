"""Scheduler policy without the network: KV budget, chunked prefill, collection window."""
import asyncio

import pytest
import torch

from edge_server.kv_cache import KVBudgetError, KVPool
from edge_server.sampling import Sampling
from edge_server.scheduler import Scheduler, SchedulerConfig
from edge_server.session import Session
from edge_server.verifier import TargetModel
from shared.tree import TokenTree


def test_kv_budget_refuses_with_a_clear_message():
    pool = KVPool(num_layers=2, kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu", budget_tokens=256)
    slot = pool.allocate(120)
    with pytest.raises(KVBudgetError, match="KV budget exhausted.*needs 150.*only 136 of 256"):
        pool.allocate(150)
    pool.free(slot)
    pool.free(slot)  # idempotent
    assert pool.free_tokens == 256
    pool.allocate(256)


@pytest.fixture(scope="module")
def target(loaded):
    return TargetModel(loaded.model, max_context=8192)


def test_warm_up_gives_back_its_scratch_slot(target):
    """The server warms up before it listens (TargetModel.warm_up); the KV budget stays whole."""
    pool = KVPool.for_model(target.model, 256)
    free = pool.free_tokens
    target.warm_up(pool)
    assert pool.free_tokens == free and pool.used_tokens == 0


def test_long_prefill_does_not_stall_other_rounds(target):
    """Two 400-token prompts are fed in chunks; a decoding session keeps getting rounds
    meanwhile, each in a step with at most one chunk of prompt, though the token room holds
    three."""
    pool = KVPool.for_model(target.model, 256)
    sched = Scheduler(target, pool, SchedulerConfig(max_batch_tokens=128, prefill_chunk=32),
                      max_tree_nodes=16)

    def session(prompt):
        s = Session(prompt, Sampling(), max_new_tokens=64, stop_ids=frozenset(), want_hidden=False)
        sched.admit(s, len(prompt) + 64 + 16)
        return s

    async def main():
        a = session([1, 9690, 198, 2683, 314, 253])
        await sched.prefill(a)
        long_prefills = asyncio.gather(*(sched.prefill(session(list(range(start, start + 400))))
                                         for start in (1000, 2000)))
        rounds_during = 0
        for _ in range(12):
            res, info = await sched.verify(a, TokenTree.root_only(a.bonus))
            if not long_prefills.done():
                rounds_during += 1
                assert info.batch_tokens <= 1 + 32
        await long_prefills
        return rounds_during, a

    try:
        rounds_during, a = asyncio.run(main())
    finally:
        sched.stop()
    assert rounds_during >= 4  # 400 tokens / 32 per step: a's rounds ride along the chunks
    # a's tokens are still the target's greedy continuation
    with torch.inference_mode():
        ref = target.model.generate(torch.tensor([a.prompt_ids]), do_sample=False, max_new_tokens=len(a.generated),
                                    attention_mask=torch.ones(1, len(a.prompt_ids), dtype=torch.long))
    assert a.generated == ref[0, len(a.prompt_ids):].tolist()


def _tiny_pool() -> KVPool:
    """The KV pool of a scheduler without a model (its prompt cache sizes itself from the pool)."""
    return KVPool(num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", budget_tokens=64)


def _deadline_wait_ms(ready: list[str], active: list[str], due_ms: dict[str, float],
                      step_ms: float = 100.0, drafting: tuple[str, ...] = (), spread_ms: float = 0.0) -> float:
    """How long the scheduler would wait for more rows, with `due_ms` the expected arrival of
    each missing session's next item (from its turnaround history) and `spread_ms` the
    turnarounds' mean deviation; `drafting` sessions are pipelined ones whose draft for this
    round is not in yet."""
    from types import SimpleNamespace
    import time

    sched = Scheduler(None, _tiny_pool(), SchedulerConfig(window_ms=2.0, window_max_ms=50.0), max_tree_nodes=16)
    try:
        now = time.perf_counter()
        sched._active = set(active)
        sched._pending = [SimpleNamespace(session=SimpleNamespace(id=sid, draft=None, round=3, speculative=True,
                                                                   tree_cap=16),
                                          pipelined=sid in drafting) for sid in ready]
        sched.recent_step_ms = step_ms
        for sid, due in due_ms.items():  # sent 10 ms ago, back after 10 + due ms
            sched._sent[sid] = {3: now - 0.010}
            sched._turnaround[sid] = (0.010 + due / 1e3, spread_ms / 1e3)
        return (sched._collection_deadline() - now) * 1e3
    finally:
        sched._pending = []  # stand-ins, not real items: nothing for the model thread to cancel
        sched.stop()


def test_collection_window_waits_for_devices_due_soon_only():
    everyone = ["a", "b", "c", "d"]
    assert _deadline_wait_ms(everyone, everyone, {}) < 1.0  # all ready: no wait
    # d is due in 5 ms; one row more is worth up to 100 ms x 1/3 of waiting: wait ~5 + 2 ms
    assert 6.0 <= _deadline_wait_ms(everyone[:3], everyone, {"d": 5.0}) <= 8.5
    # d is due in 40 ms: more than the step time it would save the others (33 ms): do not wait
    assert _deadline_wait_ms(everyone[:3], everyone, {"d": 40.0}) <= 2.5
    # no history yet: the short default window
    assert _deadline_wait_ms(everyone[:3], everyone, {}) <= 2.5
    # a lone waiting session among slow steps is capped by window_max_ms
    assert _deadline_wait_ms(["a"], ["a", "b"], {"b": 45.0}, step_ms=400.0) <= 50.5


def test_collection_window_allows_for_devices_whose_answer_time_varies():
    everyone = ["a", "b", "c", "d"]
    # devices sharing a core answer 5-40 ms after a verdict, in any order: d, due in 5 ms on
    # average with a mean deviation of 8, is waited for until 5 + 2 x 8 (+ 2) ms, not 7
    assert 22.0 <= _deadline_wait_ms(everyone[:3], everyone, {"d": 5.0}, spread_ms=8.0) <= 23.5
    # never past what the row is worth: a third of the 100 ms step
    assert 32.0 <= _deadline_wait_ms(everyone[:3], everyone, {"d": 5.0}, spread_ms=30.0) <= 34.0


def test_pipelined_step_waits_briefly_for_a_fresh_draft():
    # a lone pipelined session: its draft due in 4 ms is worth waiting for (half a step: 50 ms)
    assert 5.0 <= _deadline_wait_ms(["a"], ["a"], {"a": 4.0}, drafting=("a",)) <= 7.5
    # a draft a 4g round trip away (60 ms) is not: decode on, and re-root it when it comes
    assert _deadline_wait_ms(["a"], ["a"], {"a": 60.0}, drafting=("a",)) <= 2.5


def test_pipelined_tree_follows_generation_into_the_latest_draft():
    s = Session([1, 2, 3], Sampling(), max_new_tokens=64, stop_ids=frozenset(), want_hidden=False)
    s.generated, s.round_ends, s.round = [10], [1], 0  # the prefill's verdict: bonus 10
    assert s.pipelined_tree(8) == TokenTree.root_only(10)  # no draft yet: decode alone
    # a draft built on round 0 (root 10): 10 -> 11 -> 13 -> 14, and 10 -> 12
    s.draft = (1, TokenTree((10, 11, 12, 13, 14), (-1, 0, 0, 1, 3)))
    assert s.root_for_round(1) == 10
    assert s.pipelined_tree(8) == s.draft[1]  # fresh: verified as sent
    assert s.pipelined_tree(2) == TokenTree((10, 11), (-1, 0))  # the budget shrank since: cut to it
    assert s.pipelined_tree(1) == TokenTree.root_only(10)
    s.generated, s.round_ends, s.round = [10, 11], [1, 2], 1  # the server decoded 11 meanwhile
    assert s.pipelined_tree(8) == TokenTree((11, 13, 14), (-1, 0, 1))  # re-rooted, still ahead
    s.generated, s.round_ends, s.round = [10, 11, 99], [1, 2, 3], 2  # generation left the tree
    assert s.pipelined_tree(8) == TokenTree.root_only(99)


@pytest.fixture
def lone_device():
    """A scheduler (no model) with one speculative session whose device drafts up to 16 nodes."""
    sched = Scheduler(None, _tiny_pool(), SchedulerConfig(), max_tree_nodes=16)
    s = Session([1, 2, 3], Sampling(), max_new_tokens=64, stop_ids=frozenset(), want_hidden=True, tree_cap=16)
    sched.budgets.add(s.id, True, s.tree_cap)
    sched.metrics.session_open(s.id, "speculative")
    yield sched, s
    sched.stop()


def test_a_lock_step_device_on_a_slow_link_is_given_budget_one(lone_device):
    """The load level allows trees, but 2 tokens per 600 ms answer lose to decoding alone."""
    sched, s = lone_device
    sched.recent_step_ms = 65.0
    assert sched.next_round(s) == (8, [])  # a lone session starts at START_NODES, nodes not yet priced
    for answer_s in (0.6, 0.6):
        s.link.tree_round(answer_s, 4, 2)
    assert sched.next_round(s) == (1, [])
    assert sched.metrics.sessions[s.id].budget == 1  # what the verdict handed out, not the level


@pytest.mark.parametrize("mode", ["lock-step", "pipelined"])
def test_a_device_whose_trees_yield_less_than_their_price_is_given_budget_one(mode, lone_device, monkeypatch):
    """The load's prices say a node pays from a 30% chance; this device's 4-node trees add 0.2
    tokens a round (an n-gram drafter on text it cannot predict), not the 0.9 their nodes cost."""
    sched, s = lone_device
    sched.recent_step_ms = 40.0
    monkeypatch.setattr(sched.budgets, "node_prices", lambda: [0.3, 0.3, 0.3])
    assert sched.next_round(s) == (8, [0.3, 0.3, 0.3])
    answer_s = 0.002 if mode == "lock-step" else None
    for r in range(21):
        s.link.tree_round(answer_s, 4, 2 if r % 5 == 0 else 1)
    assert sched.next_round(s) == (1, [])
    assert sched.metrics.totals()["trees_declined"] == 1
    monkeypatch.setattr(sched.budgets, "node_prices", lambda: [0.02, 0.02, 0.02])  # a lighter load
    assert sched.next_round(s) == (8, [0.02, 0.02, 0.02])
    assert sched.metrics.totals()["trees_declined"] == 1
