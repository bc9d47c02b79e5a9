"""One generation over the Generate stream: draft, send, receive verdicts, repeat.

Lock-step ("speculative"): one round in flight; a verdict's bonus token is the next tree's
root and the server waits for that tree, unless the verdict's budget is 1 (the server is too
busy for trees to pay, or the device's cap is 1): then the server decodes alone until a verdict
with a bigger budget asks for a tree again. Pipelined: the server decodes on without waiting and
verifies whichever draft it holds; the device drafts on the newest verdict it has whenever it
is free, so a slow link or a slow drafter costs acceptance, never the server's pace.
Server-ar: the server decodes alone.
"""
from __future__ import annotations

import math
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from device_client.drafters.base import Drafter
from device_client.tree_builders import within_depth
from shared.metrics import GRPC_PREFIX_BYTES, GenerationRecord
from shared.protocol import RETRY_AFTER_MS, pb, rpc

FINISH_NAMES = {pb.FINISH_NONE: "none", pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length",
                pb.FINISH_CONTEXT: "context", pb.FINISH_CANCELLED: "cancelled"}


MODES = {"speculative": pb.MODE_SPECULATIVE, "pipelined": pb.MODE_PIPELINED, "server-ar": pb.MODE_SERVER_AR}


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    tree_budget: int = 16
    mode: str = "speculative"  # a key of MODES
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_context: int = 0  # the server's (ServerInfo.max_context): drafts are cut to fit; 0 = unknown

    @property
    def drafts(self) -> bool:
        return self.mode != "server-ar"


def _wire(msg) -> int:
    return msg.ByteSize() + GRPC_PREFIX_BYTES


class _Uplink:
    """Feeds the request stream and counts its bytes."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.bytes = 0

    def send(self, msg: pb.ClientMessage) -> None:
        self.bytes += _wire(msg)
        self.queue.put(msg)

    def close(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        return iter(self.queue.get, None)


class _Downlink:
    """Receives the response stream on its own thread, stamping each message on arrival, so the
    loop can take every verdict that is already in (pipelined mode streams them without
    waiting for drafts) and draft once, on the newest."""

    def __init__(self, responses) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.responses = responses
        self.ended = threading.Event()
        threading.Thread(target=self._pump, name="edgespec-downlink", daemon=True).start()

    def _pump(self) -> None:
        try:
            for msg in self.responses:
                self.inbox.put((time.perf_counter(), msg))
        except grpc.RpcError as err:
            self.inbox.put((time.perf_counter(), err))
        self.inbox.put((time.perf_counter(), None))
        self.ended.set()

    def wait_end(self, timeout: float) -> None:
        """Waits up to `timeout` for the end of the stream (the server's answer to a Cancel)."""
        self.ended.wait(timeout)

    def take(self) -> list[tuple[float, pb.ServerMessage]]:
        """Blocks for the next message, then adds every one already waiting. The end of the
        stream is an error only where a message was still due."""
        got = []
        item = self.inbox.get()
        while True:
            arrived, msg = item
            if isinstance(msg, grpc.RpcError):
                raise msg
            if msg is None:
                if got:
                    self.inbox.put(item)  # leave the end for a later take
                    return got
                raise RuntimeError("the server closed the stream before the generation finished")
            got.append((arrived, msg))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return got


RESUMABLE = grpc.StatusCode.UNAVAILABLE  # the connection broke or the server went away: try again


def busy_retry_after_s(err: grpc.RpcError) -> float | None:
    """The wait a busy server asked for with its refusal (RESOURCE_EXHAUSTED carrying
    RETRY_AFTER_MS), or None: any other error, which waiting will not cure."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return next((int(value) / 1e3 for key, value in err.trailing_metadata() or () if key == RETRY_AFTER_MS), None)


def generate(stub: rpc.EdgeSpecStub, request: Request, drafter: Drafter, tokenizer_fingerprint: str,
             on_tokens: Callable[[list[int]], None] | None = None,
             timeout: float | None = None, reconnect_s: float = 0.0, busy_wait_s: float = 0.0,
             on_waiting: Callable[[int], None] | None = None,
             failover: Callable[[], rpc.EdgeSpecStub | None] | None = None) -> GenerationRecord:
    """Runs one generation; on_tokens sees each verdict's new tokens as they arrive, and
    on_waiting how many streams wait ahead of this one in a full server's admission line.

    A stream that breaks (UNAVAILABLE: a dropped connection, a restarted server) is resumed for
    up to `reconnect_s` seconds after the break: a new stream sends the tokens received so far
    (Start.resume_token_ids) and the server goes on exactly where the first left off, so a
    flaky link costs time, never tokens (none lost, none repeated, the same ones). When the
    server cannot be reached again, or turns the stream away (it is shutting down), `failover`
    may name another server's stub, running the same model, to resume on (None: keep trying
    this one). A busy server that refuses the stream is asked again after the wait it suggests,
    for up to `busy_wait_s` seconds after the refusal (a resumption refused so keeps its tokens
    too)."""
    if request.mode not in MODES:
        raise ValueError(f"mode {request.mode!r} is not one of {', '.join(MODES)}")
    run = _Generation(stub, request, drafter, tokenizer_fingerprint, on_tokens, on_waiting)
    deadline = None if timeout is None else run.t0 + timeout
    trouble, pause = None, 0.0  # when the stream broke or was refused (after its last progress); the next wait
    while True:
        streams = run.started
        try:
            run.stream(None if deadline is None else max(0.0, deadline - time.perf_counter()))
            break
        except grpc.RpcError as err:
            now = time.perf_counter()
            again = trouble is not None and run.started == streams  # another failed attempt
            if not again:
                trouble, pause = now, 0.0
            busy = busy_retry_after_s(err)
            if busy is not None:
                window, wait = busy_wait_s, busy * random.uniform(0.8, 1.2)  # refused devices spread out
            elif err.code() == RESUMABLE:
                window, wait = reconnect_s, pause
                pause = min(2.0, max(0.1, 2 * pause))
                if again and failover is not None:  # first this server again (it holds the KV), then another
                    run.stub = failover() or run.stub
            else:
                raise
            left = min(trouble + window, deadline or math.inf) - now
            if left <= 0:
                raise
            if busy is not None:
                run.rec.busy_refusals += 1
                run.rec.busy_wait_ms += min(wait, left) * 1e3
            time.sleep(min(wait, left))  # the last try comes when the time is up
    run.rec.total_ms = (time.perf_counter() - run.t0) * 1e3
    return run.rec


class _Generation:
    """The state one generation keeps across its streams: the record, and when the last
    tokens arrived (inter-token latency spans a reconnect)."""

    def __init__(self, stub: rpc.EdgeSpecStub, request: Request, drafter: Drafter, tokenizer_fingerprint: str,
                 on_tokens: Callable[[list[int]], None] | None, on_waiting: Callable[[int], None] | None):
        self.stub, self.request, self.drafter, self.on_tokens = stub, request, drafter, on_tokens
        self.on_waiting = on_waiting
        self.fingerprint = tokenizer_fingerprint
        self.rec = GenerationRecord(prompt_token_ids=list(request.prompt_ids),
                                    drafter=drafter.name if request.drafts else "server-ar", mode=request.mode)
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.started = 0  # streams that got their Started
        self.session_id = ""  # the latest Started's: a resumption names it (Start.resume_session_id)

    def _start(self) -> pb.Start:
        request = self.request
        return pb.Start(
            prompt_token_ids=request.prompt_ids,
            sampling=pb.SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                       top_k=request.top_k, seed=request.seed),
            max_new_tokens=request.max_new_tokens, stop_token_ids=request.stop_token_ids,
            tokenizer_fingerprint=self.fingerprint, ignore_eos=request.ignore_eos,
            mode=MODES[request.mode], want_hidden_state=self.drafter.needs_hidden_state and request.drafts,
            tree_budget=request.tree_budget if request.drafts else 0,
            resume_token_ids=self.rec.token_ids, resume_session_id=self.session_id, report_waiting=True,
        )

    def _unpack(self, arrivals) -> list[pb.Verdict]:
        """Counts rounds, bytes and inter-token latency of verdicts as they arrived."""
        rec, out = self.rec, []
        for arrived, msg in arrivals:
            rec.bytes_down += _wire(msg)
            out.append(msg.verdict)
            rec.rounds += 1
            rec.accepted_per_round.append(len(msg.verdict.tokens))
            self._arrived(arrived, len(msg.verdict.tokens))
        return out

    def _arrived(self, arrived: float, n: int) -> None:
        """Inter-token latency: n tokens share the time since the previous ones came, which is
        also how long the answer stood still."""
        if n:
            waited = (arrived - self.last) * 1e3
            self.rec.itl_ms.extend([waited / n] * n)
            self.rec.longest_pause_ms = max(self.rec.longest_pause_ms, waited)
        self.last = arrived

    def stream(self, timeout: float | None) -> None:
        """One Generate stream, until the generation finishes (or the stream fails)."""
        rec, request = self.rec, self.request
        up = _Uplink()
        up.send(pb.ClientMessage(start=self._start()))
        responses = self.stub.Generate(iter(up), timeout=timeout)
        down = _Downlink(responses)
        try:
            (arrived, first), *rest = self._wait_in_line(down)
            rec.bytes_down += _wire(first)
            if not self.started:
                rec.ttft_ms = (arrived - self.t0) * 1e3  # refusals and failed attempts included
                rec.cached_prompt_tokens = first.started.cached_prompt_tokens
                self.last = arrived
            else:  # the tokens after a break: their latency spans it
                rec.reconnects += 1
                self._arrived(arrived, len(first.started.first.tokens))
            self.started += 1
            self.session_id = first.started.session_id
            verdicts = [first.started.first, *self._unpack(rest)]
            while True:
                for verdict in verdicts:
                    rec.token_ids.extend(verdict.tokens)
                    rec.server_compute_ms += verdict.timings.compute_ms if verdict.round else 0.0
                    rec.server_queue_ms += verdict.timings.queue_ms
                    if self.on_tokens and verdict.tokens:
                        self.on_tokens(list(verdict.tokens))
                verdict = verdicts[-1]
                if verdict.finish_reason != pb.FINISH_NONE:
                    rec.finish_reason = FINISH_NAMES[verdict.finish_reason]
                    return
                budget = min(request.tree_budget, verdict.next_tree_budget)
                # at budget 1 the server decodes the next round alone, in every mode: no draft is due
                if request.drafts and budget > 1:
                    up.send(pb.ClientMessage(draft=self._draft(verdict, budget)))
                verdicts = self._unpack(down.take())
        except grpc.RpcError:
            raise
        except BaseException:  # the device gives the answer up (Ctrl-C, a drafter that failed): a Cancel
            up.send(pb.ClientMessage(cancel=pb.Cancel()))  # frees it at once, and no resumption is kept
            up.close()
            down.wait_end(1.0)
            raise
        finally:
            up.close()
            rec.bytes_up += up.bytes
            if isinstance(responses, grpc.Future):
                responses.cancel()

    def _wait_in_line(self, down: _Downlink) -> list[tuple[float, pb.ServerMessage]]:
        """The messages from Started on. Before it, a full server's Waiting messages tell the
        stream's place in its admission line; the time in line counts whether it ends in
        Started or in a refusal."""
        arrivals, since = down.take(), None
        try:
            while arrivals[0][1].HasField("waiting"):
                arrived, msg = arrivals.pop(0)
                since = since or arrived
                self.rec.bytes_down += _wire(msg)
                if self.on_waiting:
                    self.on_waiting(msg.waiting.ahead)
                arrivals = arrivals or down.take()
            return arrivals
        finally:
            if since is not None:
                self.rec.line_wait_ms += ((arrivals[0][0] if arrivals else time.perf_counter()) - since) * 1e3

    def _draft(self, verdict: pb.Verdict, budget: int) -> pb.Draft:
        """The tree for the round after `verdict`, built on its hidden state."""
        rec, request = self.rec, self.request
        d0 = time.perf_counter()
        hidden = (np.frombuffer(verdict.hidden_state, dtype=np.float16).astype(np.float32)
                  if verdict.hidden_state else None)
        context = rec.prompt_token_ids + rec.token_ids
        tree = self.drafter.propose(context, hidden, budget, verdict.node_prices)
        if request.max_context:  # the deepest node must sit inside the server's context
            tree = within_depth(tree, request.max_context - len(context))
        tokens, parents = tree.to_wire()
        rec.draft_ms += (time.perf_counter() - d0) * 1e3
        rec.tree_sizes.append(len(tree))
        return pb.Draft(round=verdict.round + 1, tokens=tokens, parents=parents)
