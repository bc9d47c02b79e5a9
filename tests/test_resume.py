"""Resuming a generation whose stream broke (Start.resume_token_ids): the tokens the device
already has are fed after the prompt as one-token decoding steps, so the resumed session holds
bitwise the K/V the first stream's rounds computed and goes on with the first stream's tokens."""
import asyncio

import pytest
import torch

from edge_server.kv_cache import KVPool, exact_one_token_queries
from edge_server.sampling import Sampling
from edge_server.scheduler import Scheduler, SchedulerConfig
from edge_server.session import Session
from shared.protocol import pb
from shared.tree import TokenTree

N, CUT = 48, 40  # tokens in all, and how many the first stream delivered (two chain pieces of 32 + 8)


def _run(target, prompt, params, resumed=(), trees_from=None, as_prompt=False):
    """One session through a scheduler (chunks of 32): fed, then decoded alone or, with
    `trees_from` (the tokens it will generate), by trees that put a wrong sibling before each
    round's next three true tokens, so accepted nodes are moved into place. Returns its tokens and
    the K/V of every layer at the positions it committed."""
    pool = KVPool.for_model(target.model, 256)
    sched = Scheduler(target, pool, SchedulerConfig(prefill_chunk=32, prompt_cache_mb=0), max_tree_nodes=8)
    fed = list(prompt) + list(resumed) if as_prompt else list(prompt)  # as_prompt: the naive way, as prompt chunks
    s = Session(fed, params, N - (len(resumed) if as_prompt else 0), frozenset(), False,
                generated=[] if as_prompt else list(resumed), resumed=0 if as_prompt else len(resumed))

    async def main():
        sched.admit(s, len(fed) + N + 8)
        await sched.prefill(s)
        while s.finish == pb.FINISH_NONE:
            tree = TokenTree.root_only(s.bonus)
            if trees_from is not None:
                true = trees_from[len(s.generated):len(s.generated) + 3]
                if true:
                    wrong = (true[0] + 1) % target.vocab_size
                    tree = TokenTree.from_wire(s.bonus, [wrong, *true], [0, 0, *range(2, len(true) + 1)])
            await sched.verify(s, tree)
        # the positions of the prompt and every token but the last (a last round may commit
        # accepted nodes past the tokens max_new_tokens lets it send)
        return s.generated, s.slot.storage[:, :, :, :len(fed) + len(s.generated) - 1].clone()

    try:
        return asyncio.run(main())
    finally:
        sched.stop()


@pytest.mark.parametrize("params", [Sampling(), Sampling(0.8, 0.95, 0, seed=5)], ids=["greedy", "sampled"])
def test_a_resumed_session_holds_the_first_streams_kv_and_goes_on_with_its_tokens(target, client, params):
    """Bitwise where a tree node is bitwise a decoding step (bf16 on a CPU); in fp32 trees and
    steps differ by rounding (edge_server.kv_cache.exact_one_token_queries), and so do these."""
    prompt = client[2].chat_ids("Explain how a refrigerator works, step by step.")
    alone, _ = _run(target, prompt, params)
    first, first_kv = _run(target, prompt, params, trees_from=alone)
    assert first == alone and len(first) == N
    resumed, resumed_kv = _run(target, prompt, params, resumed=first[:CUT])
    assert resumed == first
    if not exact_one_token_queries(target.dtype, target.device):
        torch.testing.assert_close(resumed_kv, first_kv, rtol=1e-3, atol=1e-4)
        return
    assert torch.equal(resumed_kv.view(torch.uint8), first_kv.view(torch.uint8))
    # fed as prompt chunks instead, the same tokens' K/V come from steps of another shape
    _, naive_kv = _run(target, prompt, params, resumed=first[:CUT], as_prompt=True)
    assert not torch.equal(naive_kv[..., len(prompt):len(prompt) + CUT, :],
                           first_kv[..., len(prompt):len(prompt) + CUT, :])


def test_a_resumption_copies_what_the_broken_session_left_in_the_prompt_cache(target, client):
    """A session released before it finished leaves its prompt and tokens in the prompt cache;
    resuming it feeds only its last token (whose logits give the next one)."""
    prompt = client[2].chat_ids("Explain how a refrigerator works, step by step.")
    alone, alone_kv = _run(target, prompt, Sampling())
    pool = KVPool.for_model(target.model, 256)
    sched = Scheduler(target, pool, SchedulerConfig(prefill_chunk=32, prompt_cache_mb=64), max_tree_nodes=8)

    async def decode(s, until):
        sched.admit(s, len(prompt) + N + 8)
        await sched.prefill(s)
        while s.finish == pb.FINISH_NONE and len(s.generated) < until:
            await sched.verify(s, TokenTree.root_only(s.bonus))

    async def main():
        first = Session(list(prompt), Sampling(), N, frozenset(), False)
        await decode(first, CUT)
        sched.release(first)  # its stream broke
        again = Session(list(prompt), Sampling(), N, frozenset(), False, generated=first.generated[:CUT], resumed=CUT)
        await decode(again, N)
        return again

    try:
        again = asyncio.run(main())
    finally:
        sched.stop()
    assert again.prompt_cached == len(prompt) + CUT - 1 and again.generated == alone
    kv = again.slot.storage[:, :, :, :len(prompt) + N - 1]
    if exact_one_token_queries(target.dtype, target.device):
        assert torch.equal(kv.view(torch.uint8), alone_kv.view(torch.uint8))
    else:
        torch.testing.assert_close(kv, alone_kv, rtol=1e-3, atol=1e-4)
