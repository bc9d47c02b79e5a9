"""Scheduler policy without the network: cost model, load-aware budgets, chunked prefill."""
import asyncio

import numpy as np
import pytest
import torch

from edge_server.kv_cache import KVBudgetError, KVPool
from edge_server.sampling import Sampling
from edge_server.scheduler import BudgetPolicy, CostModel, Scheduler, SchedulerConfig
from edge_server.session import Session
from edge_server.verifier import TargetModel
from shared.tree import TokenTree


def test_cost_model_recovers_linear_costs():
    cost = CostModel(base_ms=10, per_token_ms=1, per_row_ms=1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, tokens = int(rng.integers(1, 16)), int(rng.integers(1, 256))
        cost.observe(rows, tokens, 25 + 0.8 * tokens + 2 * rows + rng.normal(0, 0.5))
    assert cost.ms(1, 0) == pytest.approx(27, abs=3)
    assert cost.coef[1] == pytest.approx(0.8, abs=0.05)


def _policy(n_sessions: int, gain: float, base_ms: float = 30, per_token_ms: float = 1.5) -> BudgetPolicy:
    policy = BudgetPolicy(64, CostModel(base_ms, per_token_ms, 0.5))
    for i in range(n_sessions):
        policy.add(str(i), speculative=True)
        policy.stats[str(i)].gain = gain
    policy.refresh()
    return policy


def test_budget_grows_for_a_lone_session_that_accepts():
    assert _policy(1, gain=0.8).budget("0") >= 8


def test_budget_shrinks_under_load():
    lone = _policy(1, gain=0.4).budget("0")
    busy = [_policy(16, gain=0.4).budget(str(i)) for i in range(16)]
    assert max(busy) < lone
    assert max(busy) <= 2


def test_budget_stays_small_when_nothing_is_accepted():
    policy = _policy(1, gain=0.6)
    for _ in range(40):
        policy.observe("0", tree_size=16, accepted=0)
    policy.refresh()
    assert policy.budget("0") <= 2


def test_kv_budget_refuses_with_a_clear_message():
    pool = KVPool(num_layers=2, kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu", budget_tokens=100)
    slot = pool.allocate(60)
    with pytest.raises(KVBudgetError, match="KV budget exhausted.*needs 50.*only 40 of 100"):
        pool.allocate(50)
    pool.free(slot)
    pool.free(slot)  # idempotent
    assert pool.free_tokens == 100
    pool.allocate(100)


@pytest.fixture(scope="module")
def target(loaded):
    return TargetModel(loaded.model, max_context=8192)


def test_long_prefill_does_not_stall_other_rounds(target):
    """A 400-token prompt is fed in chunks; a decoding session keeps getting rounds meanwhile."""
    pool = KVPool.for_model(target.model, 256)
    sched = Scheduler(target, pool, SchedulerConfig(max_batch_tokens=64, prefill_chunk=64, prefill_min_chunk=16),
                      max_tree_nodes=16)

    def session(prompt):
        s = Session(prompt, Sampling(), max_new_tokens=64, stop_ids=frozenset(), want_hidden=False)
        sched.admit(s, len(prompt) + 64 + 16)
        return s

    async def main():
        a = session([1, 9690, 198, 2683, 314, 253])
        await sched.prefill(a)
        b = session(list(range(1000, 1400)))
        long_prefill = asyncio.ensure_future(sched.prefill(b))
        rounds_during = 0
        for _ in range(12):
            res, info = await sched.verify(a, TokenTree.root_only(a.bonus))
            if not long_prefill.done():
                rounds_during += 1
                assert info.batch_tokens <= 64
        await long_prefill
        return rounds_during, a

    try:
        rounds_during, a = asyncio.run(main())
    finally:
        sched.stop()
    assert rounds_during >= 4  # 400 tokens / 64 per step: a's rounds ride along the chunks
    # a's tokens are still the target's greedy continuation
    with torch.inference_mode():
        ref = target.model.generate(torch.tensor([a.prompt_ids]), do_sample=False, max_new_tokens=len(a.generated),
                                    attention_mask=torch.ones(1, len(a.prompt_ids), dtype=torch.long))
    assert a.generated == ref[0, len(a.prompt_ids):].tolist()
