"""The Generate stream's round protocol, without a model: when a lock-step Draft is due, when
the server decodes alone, and what happens to Drafts nobody asked for.

A synthetic target (the next token is always the previous one + 1) and a scheduler that
serves each item at once stand in for the model thread; the service under test is the real
EdgeSpecService. End-to-end runs of the same rules on the real model are in test_lossless.py.
"""
import asyncio
from types import SimpleNamespace

import grpc
import pytest
import torch

from edge_server.metrics import ServerMetrics
from edge_server.scheduler import SchedulerConfig, StepInfo
from edge_server.service import EdgeSpecService, Limits
from shared.protocol import pb

VOCAB, HIDDEN, CONTEXT = 64, 4, 512
STEP = StepInfo(queue_ms=0.0, compute_ms=1.0, batch_size=1, batch_tokens=1)


def _next_token_logits(tokens) -> torch.Tensor:
    return torch.nn.functional.one_hot((torch.tensor(list(tokens)) + 1) % VOCAB, VOCAB).float()


class CountingTarget:
    """The unbatched TargetModel interface: greedy continues any token t with t + 1."""
    vocab_size, max_context = VOCAB, CONTEXT

    def new_cache(self):
        return None

    def prefill(self, cache, ids):
        return SimpleNamespace(logits=_next_token_logits(ids), hidden=torch.ones(len(ids), HIDDEN))

    def forward_tree(self, cache, committed, tree):
        return SimpleNamespace(logits=_next_token_logits(tree.tokens), hidden=torch.ones(len(tree), HIDDEN))

    def commit(self, cache, committed, path):
        return committed + len(path)


class InstantScheduler:
    """Serves every item at once; the budgets it hands out come from a script."""
    config = SchedulerConfig()

    def __init__(self, budgets):
        self.target, self.budgets, self.trees = CountingTarget(), list(budgets), []
        self.pool, self.metrics, self.on_room = SimpleNamespace(budget_tokens=1 << 20), ServerMetrics(), None

    def admit(self, session, capacity):
        pass

    def prefill_backlog(self, session):
        return 0

    def release(self, session):
        pass

    def next_round(self, session):
        budget = self.budgets.pop(0) if self.budgets else 1
        return budget, [0.25, 0.5][:(budget - 1).bit_length()]

    async def prefill(self, session):
        return session.prefill(self.target), STEP

    async def verify(self, session, tree):
        self.trees.append(len(tree))
        await asyncio.sleep(0)
        return session.verify(self.target, tree), STEP


def _service(budgets) -> EdgeSpecService:
    return EdgeSpecService(CountingTarget(), "counting", "", [], None, "tok",
                           Limits(max_tree_nodes=16, idle_timeout_s=5.0, max_waiting=0, admission_wait_s=0.0),
                           "test", InstantScheduler(budgets))


class Aborted(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Context:
    def peer(self):
        return "ipv4:127.0.0.1:1"

    async def abort(self, code, message, trailing_metadata=()):
        raise Aborted(code, message)


def _start(mode=pb.MODE_SPECULATIVE, max_new=12):
    return pb.ClientMessage(start=pb.Start(prompt_token_ids=[3, 4, 5], max_new_tokens=max_new, mode=mode,
                                           tokenizer_fingerprint="tok", ignore_eos=True, want_hidden_state=True))


async def _device(svc, start, reply):
    """A device: after each verdict, `reply(verdict)` gives the message to send (or None).
    Returns the verdicts and the drafts it sent."""
    up: asyncio.Queue = asyncio.Queue()
    up.put_nowait(start)

    async def uplink():
        while (msg := await up.get()) is not None:
            yield msg

    verdicts, sent = [], []
    async for msg in svc.Generate(uplink(), Context()):
        verdict = msg.started.first if msg.WhichOneof("kind") == "started" else msg.verdict
        verdicts.append(verdict)
        answer = reply(verdict)
        if answer is not None:
            sent.append(answer)
            up.put_nowait(answer)
    up.put_nowait(None)
    return verdicts, sent


def _draft(round_, tokens, parents):
    return pb.ClientMessage(draft=pb.Draft(round=round_, tokens=tokens, parents=parents))


def _good_draft(verdict):
    """Lock-step: a two-node chain the counting target accepts, only when a tree is asked for."""
    if verdict.next_tree_budget <= 1 or verdict.finish_reason != pb.FINISH_NONE:
        return None
    root = verdict.tokens[-1]
    return _draft(verdict.round + 1, [(root + 1) % VOCAB, (root + 2) % VOCAB], [0, 1])


def test_lock_step_waits_for_trees_only_when_the_budget_asks_for_one():
    svc = _service([4, 1, 1, 3, 1, 2, 1, 1, 1, 1])
    verdicts, sent = asyncio.run(_device(svc, _start(), _good_draft))
    tokens = [t for v in verdicts for t in v.tokens]
    assert tokens == [(6 + i) % VOCAB for i in range(12)]  # nothing lost or duplicated
    asked = [v for v in verdicts[:-1] if v.next_tree_budget > 1]
    assert len(sent) == len(asked) == sum(1 for n in svc.scheduler.trees if n > 1)
    # budget 1: the server decoded the next round alone (a root-only tree), without a round trip
    assert svc.scheduler.trees[:4] == [3, 1, 1, 3]
    # hidden states travel only with verdicts that ask for a tree
    assert all(bool(v.hidden_state) == (v.next_tree_budget > 1) for v in verdicts)
    # and so do the nodes' prices (the scheduler's)
    assert all(list(v.node_prices) == [0.25, 0.5][:(v.next_tree_budget - 1).bit_length()] for v in verdicts)


def test_a_tree_the_price_left_empty_is_a_round_of_its_root():
    # a device whose every node fell below the verdict's price answers with the root alone
    svc = _service([4] * 20)
    verdicts, sent = asyncio.run(_device(svc, _start(), lambda v: _draft(v.round + 1, [], [])
                                         if v.finish_reason == pb.FINISH_NONE else None))
    assert [t for v in verdicts for t in v.tokens] == [(6 + i) % VOCAB for i in range(12)]
    assert svc.scheduler.trees == [1] * 11 and len(sent) == 11


@pytest.mark.parametrize("mode", [pb.MODE_SPECULATIVE, pb.MODE_SERVER_AR])
def test_a_draft_nobody_asked_for_is_refused(mode):
    svc = _service([1] * 20)
    with pytest.raises(Aborted) as err:
        asyncio.run(_device(svc, _start(mode, max_new=20),
                            lambda v: _draft(v.round + 1, [1], [0]) if v.round == 0 else None))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no Draft is due" in err.value.message
    assert not svc.sessions


def test_cancel_stops_a_lock_step_session_that_decodes_alone():
    svc = _service([1] * 100)
    verdicts, _ = asyncio.run(_device(svc, _start(max_new=100),
                                      lambda v: pb.ClientMessage(cancel=pb.Cancel()) if v.round == 2 else None))
    assert 3 <= len(verdicts) < 100
    assert not svc.sessions
