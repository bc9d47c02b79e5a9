"""Good, cancelling, vanishing and misbehaving devices at once against one adaptive server.

The other tests take one failure at a time; here they overlap, as they do in service: sessions
come and go, the load-aware budget moves, admission refuses some, and bad drafts arrive while
other sessions' trees are being verified. Every good session must still get exactly its greedy
text (nothing lost, nothing duplicated), every bad one its status, and the server must end with
no session and no KV held.
"""
from __future__ import annotations

import os
import random
import shlex
import threading

import grpc
import pytest

from device_client.cli import load_tokenizer, make_drafter
from device_client.session import Request, generate
from shared.protocol import pb, rpc

from conftest import PROMPTS, Stream, wait_for

WORKERS, ACTIONS, LONGEST = 6, 4, 24


@pytest.fixture(scope="module")
def busy_server():
    from edge_server.launcher import ServerProcess

    # fewer sessions than workers: admission refuses some while the others run
    srv = ServerProcess(["--log-level", "WARNING", "--max-sessions", "4", "--max-tree-nodes", "16",
                         "--threads", "1", "--idle-timeout", "30",
                         *shlex.split(os.environ.get("EDGESPEC_TEST_SERVER_ARGS", ""))])
    yield srv
    srv.stop()


class _Worker:
    """One device running a fixed, seeded list of actions; what went wrong goes to `problems`."""

    def __init__(self, seed: int, address: str, info, prompts: list[list[int]], references: list[list[int]]):
        self.rng, self.address, self.info = random.Random(seed), address, info
        self.prompts, self.references = prompts, references
        self.problems: list[str] = []
        self.done: dict[str, int] = {}

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = rpc.EdgeSpecStub(channel)
            drafters = {name: make_drafter(name, stub, self.info) for name in ("heads", "ngram", "none")}
            for _ in range(ACTIONS):
                action = self.rng.choice([self.good, self.good, self.leave, self.misbehave])
                try:
                    action(stub, drafters)
                except Exception as err:  # a failure of the harness, not a refused session
                    self.problems.append(f"{action.__name__}: {err!r}")

    def _count(self, what: str, n: int = 1) -> None:
        self.done[what] = self.done.get(what, 0) + n

    def good(self, stub, drafters) -> None:
        p, n = self.rng.randrange(len(self.prompts)), self.rng.randint(8, LONGEST)
        mode = self.rng.choice(["speculative", "pipelined", "server-ar"])
        name = self.rng.choice(list(drafters))
        req = Request(self.prompts[p], max_new_tokens=n, ignore_eos=True, mode=mode,
                      tree_budget=self.rng.choice([2, 4, 16]))
        try:  # refused while the server is full: the client waits as the server asks and tries again
            rec = generate(stub, req, drafters[name], self.info.tokenizer_fingerprint, timeout=120, busy_wait_s=60)
        except grpc.RpcError as err:
            self.problems.append(f"{mode}/{name} failed: {err.code()} {err.details()}")
            return
        if rec.busy_refusals:
            self._count("refused", rec.busy_refusals)
        if rec.token_ids != self.references[p][:n]:
            self.problems.append(f"{mode}/{name} budget {req.tree_budget}, prompt {p}: {rec.token_ids} "
                                 f"!= {self.references[p][:n]}")
        self._count(f"good {mode}")

    def _stream(self, stub, p: int, mode: int, budget: int) -> Stream:
        return Stream(stub, pb.ClientMessage(start=pb.Start(
            prompt_token_ids=self.prompts[p], max_new_tokens=LONGEST, ignore_eos=True, mode=mode,
            tokenizer_fingerprint=self.info.tokenizer_fingerprint, tree_budget=budget, want_hidden_state=True)))

    def leave(self, stub, drafters) -> None:
        """Starts a session and goes away after a few verdicts: Cancel, or the stream dropped."""
        p, after = self.rng.randrange(len(self.prompts)), self.rng.randint(0, 3)
        mode = self.rng.choice([pb.MODE_SPECULATIVE, pb.MODE_PIPELINED, pb.MODE_SERVER_AR])
        cancel = self.rng.random() < 0.5
        stream = self._stream(stub, p, mode, 4)
        replies = stream.replies
        try:
            for seen, msg in enumerate(replies):
                verdict = msg.started.first if msg.HasField("started") else msg.verdict
                if verdict.finish_reason != pb.FINISH_NONE:
                    break
                if seen >= after:
                    if cancel:
                        stream.send(pb.ClientMessage(cancel=pb.Cancel()))
                    else:
                        replies.cancel()
                    break
                if mode == pb.MODE_SPECULATIVE and verdict.next_tree_budget > 1:  # a one-node guess
                    stream.send(pb.ClientMessage(draft=pb.Draft(round=verdict.round + 1, tokens=[5], parents=[0])))
            for _ in replies:
                pass
            self._count("cancelled" if cancel else "dropped")
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                self.problems.append(f"leaving session got {err.code()} {err.details()}")
            else:
                self._count("refused" if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "dropped")
        finally:
            stream.close()

    BAD_TREES = [([10**6], [0]), ([5, 6], [2, 0]), ([5, 5], [0, 0])]  # out of range, not topological, twins

    def misbehave(self, stub, drafters) -> None:
        """A few good rounds, then a bad tree: INVALID_ARGUMENT for this session only."""
        p, after = self.rng.randrange(len(self.prompts)), self.rng.randint(0, 2)
        mode = self.rng.choice([pb.MODE_SPECULATIVE, pb.MODE_PIPELINED])
        tokens, parents = self.rng.choice(self.BAD_TREES)
        stream = self._stream(stub, p, mode, 8)
        replies = stream.replies
        try:
            sent = 0
            for msg in replies:
                verdict = msg.started.first if msg.HasField("started") else msg.verdict
                if verdict.finish_reason != pb.FINISH_NONE or not (
                        mode == pb.MODE_PIPELINED or verdict.next_tree_budget > 1):
                    continue
                bad = sent >= after
                stream.send(pb.ClientMessage(draft=pb.Draft(round=verdict.round + 1, tokens=tokens if bad else [],
                                                       parents=parents if bad else [])))
                sent += 1
            self._count("bad tree not reached")  # finished (or decoded alone) before the bad tree
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._count("refused")
            elif err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                self.problems.append(f"bad tree got {err.code()} {err.details()}")
            else:
                self._count("bad tree refused")
        finally:
            stream.close()


def test_misbehaving_devices_do_not_disturb_the_others(busy_server):
    with grpc.insecure_channel(busy_server.address) as channel:
        stub = rpc.EdgeSpecStub(channel)
        info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
        tokenizer = load_tokenizer(stub, info)
        prompts = [tokenizer.chat_ids(p) for p in PROMPTS[:5]]
        none = make_drafter("none", stub, info)
        references = [generate(stub, Request(ids, max_new_tokens=LONGEST, ignore_eos=True, mode="server-ar"),
                               none, info.tokenizer_fingerprint, timeout=120).token_ids for ids in prompts]
        workers = [_Worker(seed, busy_server.address, info, prompts, references) for seed in range(WORKERS)]
        threads = [threading.Thread(target=w.run) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        done: dict[str, int] = {}
        for w in workers:
            for what, n in w.done.items():
                done[what] = done.get(what, 0) + n
        problems = [p for w in workers for p in w.problems]
        assert not problems, (problems, done)
        assert sum(n for what, n in done.items() if what.startswith("good")) >= 5, done
        assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0), done
        assert stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10).active_sessions == 0
        again = generate(stub, Request(prompts[0], max_new_tokens=4, ignore_eos=True), none,
                         info.tokenizer_fingerprint, timeout=60)
        assert again.token_ids == references[0][:4]
        assert "Traceback" not in "".join(busy_server.log), "".join(busy_server.log)[-2000:]
