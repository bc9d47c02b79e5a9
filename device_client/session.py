"""One generation over the Generate stream: draft, send, receive the verdict, repeat.

The loop is strictly one round in flight: a verdict's bonus token is the next tree's root.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from device_client.drafters.base import Drafter
from shared.metrics import GRPC_PREFIX_BYTES, GenerationRecord
from shared.protocol import pb, rpc

FINISH_NAMES = {pb.FINISH_NONE: "none", pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length",
                pb.FINISH_CONTEXT: "context", pb.FINISH_CANCELLED: "cancelled"}


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    tree_budget: int = 16
    server_ar: bool = False
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


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


def generate(stub: rpc.EdgeSpecStub, request: Request, drafter: Drafter, tokenizer_fingerprint: str,
             on_tokens: Callable[[list[int]], None] | None = None,
             timeout: float | None = None) -> GenerationRecord:
    """Runs one generation; on_tokens sees each verdict's new tokens as they arrive."""
    rec = GenerationRecord(prompt_token_ids=list(request.prompt_ids),
                           drafter="server-ar" if request.server_ar else drafter.name,
                           mode="server-ar" if request.server_ar else "speculative")
    up = _Uplink()
    start = pb.Start(
        prompt_token_ids=request.prompt_ids,
        sampling=pb.SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                   top_k=request.top_k, seed=request.seed),
        max_new_tokens=request.max_new_tokens, stop_token_ids=request.stop_token_ids,
        tokenizer_fingerprint=tokenizer_fingerprint, ignore_eos=request.ignore_eos,
        mode=pb.MODE_SERVER_AR if request.server_ar else pb.MODE_SPECULATIVE,
        want_hidden_state=drafter.needs_hidden_state and not request.server_ar,
    )
    t0 = time.perf_counter()
    up.send(pb.ClientMessage(start=start))
    responses = stub.Generate(iter(up), timeout=timeout)
    try:
        first = next(responses)
        rec.bytes_down += _wire(first)
        verdict = first.started.first
        now = time.perf_counter()
        rec.ttft_ms = (now - t0) * 1e3
        last = now
        budget = request.tree_budget
        while True:
            rec.token_ids.extend(verdict.tokens)
            rec.server_compute_ms += verdict.timings.compute_ms if verdict.round else 0.0
            rec.server_queue_ms += verdict.timings.queue_ms
            if on_tokens and verdict.tokens:
                on_tokens(list(verdict.tokens))
            if verdict.finish_reason != pb.FINISH_NONE:
                rec.finish_reason = FINISH_NAMES[verdict.finish_reason]
                break
            budget = min(request.tree_budget, verdict.next_tree_budget or request.tree_budget)
            if not request.server_ar:
                d0 = time.perf_counter()
                hidden = (np.frombuffer(verdict.hidden_state, dtype=np.float16).astype(np.float32)
                          if verdict.hidden_state else None)
                tree = drafter.propose(rec.prompt_token_ids + rec.token_ids, hidden, budget)
                tokens, parents = tree.to_wire()
                rec.draft_ms += (time.perf_counter() - d0) * 1e3
                rec.tree_sizes.append(len(tree))
                up.send(pb.ClientMessage(draft=pb.Draft(round=verdict.round + 1, tokens=tokens, parents=parents)))
            msg = next(responses)
            rec.bytes_down += _wire(msg)
            verdict = msg.verdict
            now = time.perf_counter()
            rec.rounds += 1
            rec.accepted_per_round.append(len(verdict.tokens))
            if verdict.tokens:
                rec.itl_ms.extend([(now - last) * 1e3 / len(verdict.tokens)] * len(verdict.tokens))
            last = now
    finally:
        up.close()
        if isinstance(responses, grpc.Future):
            responses.cancel()
    rec.total_ms = (time.perf_counter() - t0) * 1e3
    rec.bytes_up = up.bytes
    return rec
