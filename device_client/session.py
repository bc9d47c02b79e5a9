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

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from device_client.drafters.base import Drafter
from device_client.tree_builders import within_depth
from shared.metrics import GRPC_PREFIX_BYTES, GenerationRecord
from shared.protocol import pb, rpc

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
        threading.Thread(target=self._pump, name="edgespec-downlink", daemon=True).start()

    def _pump(self) -> None:
        try:
            for msg in self.responses:
                self.inbox.put((time.perf_counter(), msg))
        except grpc.RpcError as err:
            self.inbox.put((time.perf_counter(), err))
        self.inbox.put((time.perf_counter(), None))

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


def generate(stub: rpc.EdgeSpecStub, request: Request, drafter: Drafter, tokenizer_fingerprint: str,
             on_tokens: Callable[[list[int]], None] | None = None,
             timeout: float | None = None) -> GenerationRecord:
    """Runs one generation; on_tokens sees each verdict's new tokens as they arrive."""
    if request.mode not in MODES:
        raise ValueError(f"mode {request.mode!r} is not one of {', '.join(MODES)}")
    rec = GenerationRecord(prompt_token_ids=list(request.prompt_ids),
                           drafter=drafter.name if request.drafts else "server-ar", mode=request.mode)
    up = _Uplink()
    start = pb.Start(
        prompt_token_ids=request.prompt_ids,
        sampling=pb.SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                   top_k=request.top_k, seed=request.seed),
        max_new_tokens=request.max_new_tokens, stop_token_ids=request.stop_token_ids,
        tokenizer_fingerprint=tokenizer_fingerprint, ignore_eos=request.ignore_eos,
        mode=MODES[request.mode], want_hidden_state=drafter.needs_hidden_state and request.drafts,
        tree_budget=request.tree_budget if request.drafts else 0,
    )
    t0 = time.perf_counter()
    up.send(pb.ClientMessage(start=start))
    responses = stub.Generate(iter(up), timeout=timeout)
    try:
        down = _Downlink(responses)
        (arrived, first), *rest = down.take()
        rec.bytes_down += _wire(first)
        rec.ttft_ms = (arrived - t0) * 1e3
        rec.cached_prompt_tokens = first.started.cached_prompt_tokens
        last = arrived

        def unpack(arrivals) -> list[pb.Verdict]:
            """Counts rounds, bytes and inter-token latency of verdicts as they arrived."""
            nonlocal last
            out = []
            for arrived, msg in arrivals:
                rec.bytes_down += _wire(msg)
                out.append(msg.verdict)
                rec.rounds += 1
                rec.accepted_per_round.append(len(msg.verdict.tokens))
                if msg.verdict.tokens:
                    n = len(msg.verdict.tokens)
                    rec.itl_ms.extend([(arrived - last) * 1e3 / n] * n)
                last = arrived
            return out

        verdicts = [first.started.first, *unpack(rest)]
        while True:
            for verdict in verdicts:
                rec.token_ids.extend(verdict.tokens)
                rec.server_compute_ms += verdict.timings.compute_ms if verdict.round else 0.0
                rec.server_queue_ms += verdict.timings.queue_ms
                if on_tokens and verdict.tokens:
                    on_tokens(list(verdict.tokens))
            verdict = verdicts[-1]
            if verdict.finish_reason != pb.FINISH_NONE:
                rec.finish_reason = FINISH_NAMES[verdict.finish_reason]
                break
            budget = min(request.tree_budget, verdict.next_tree_budget)
            # at budget 1 the server decodes the next round alone, in every mode: no draft is due
            if request.drafts and budget > 1:
                d0 = time.perf_counter()
                hidden = (np.frombuffer(verdict.hidden_state, dtype=np.float16).astype(np.float32)
                          if verdict.hidden_state else None)
                context = rec.prompt_token_ids + rec.token_ids
                tree = drafter.propose(context, hidden, budget, verdict.node_prices)
                if request.max_context:  # the deepest node must sit inside the server's context
                    tree = within_depth(tree, request.max_context - len(context))
                tokens, parents = tree.to_wire()
                rec.draft_ms += (time.perf_counter() - d0) * 1e3
                rec.tree_sizes.append(len(tree))
                up.send(pb.ClientMessage(draft=pb.Draft(round=verdict.round + 1, tokens=tokens, parents=parents)))
            verdicts = unpack(down.take())
    finally:
        up.close()
        if isinstance(responses, grpc.Future):
            responses.cancel()
    rec.total_ms = (time.perf_counter() - t0) * 1e3
    rec.bytes_up = up.bytes
    return rec
