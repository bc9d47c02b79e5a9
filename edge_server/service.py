"""The gRPC service: validates what devices send, runs sessions, streams verdicts.

Every bad input is answered with a gRPC status whose message says what to change; the failed
session is freed and every other session keeps running.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np

from edge_server.artifacts import ArtifactStore
from edge_server.sampling import Sampling, check_sampling
from edge_server.session import RoundResult, Session
from edge_server.verifier import TargetModel
from edge_server.worker import ModelWorker
from shared.protocol import pb, rpc
from shared.tree import TokenTree, TreeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_tree_nodes: int = 128
    max_new_tokens: int = 4096
    max_sessions: int = 64


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _require(ok: bool, code: grpc.StatusCode, message: str) -> None:
    if not ok:
        raise BadRequest(code, message)


class EdgeSpecService(rpc.EdgeSpecServicer):
    def __init__(self, target: TargetModel, model_name: str, model_fingerprint: str,
                 eos_ids: list[int], artifacts: ArtifactStore, tokenizer_fingerprint: str,
                 limits: Limits, version: str):
        self.target = target
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.eos_ids = eos_ids
        self.artifacts = artifacts
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.limits = limits
        self.version = version
        self.worker = ModelWorker()
        self.sessions: dict[str, Session] = {}

    # ---- unary calls -------------------------------------------------------------------
    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        return pb.ServerInfo(
            model_name=self.model_name, model_fingerprint=self.model_fingerprint,
            vocab_size=self.target.vocab_size, hidden_size=self.target.hidden_size,
            max_context=self.target.max_context, max_tree_nodes=self.limits.max_tree_nodes,
            max_new_tokens=self.limits.max_new_tokens, eos_token_ids=self.eos_ids,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            artifacts=[pb.ArtifactInfo(name=a.name, sha256=a.sha256, size=a.size) for a in self.artifacts],
            dtype=str(self.target.dtype).removeprefix("torch."), device=str(self.target.device),
            server_version=self.version, active_sessions=len(self.sessions),
        )

    async def FetchArtifact(self, request, context) -> AsyncIterator[pb.ArtifactChunk]:
        art = self.artifacts.get(request.name)
        if art is None:
            names = ", ".join(a.name for a in self.artifacts)
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no artifact named {request.name!r}; this server has: {names}")
        if request.sha256 and request.sha256 != art.sha256:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"artifact {art.name} has sha256 {art.sha256}, not {request.sha256}; "
                                "call GetServerInfo for the current digests")
        for offset, data in art.chunks():
            yield pb.ArtifactChunk(offset=offset, data=data, total_size=art.size, sha256=art.sha256)

    # ---- the generation stream ---------------------------------------------------------
    async def Generate(self, request_iterator, context) -> AsyncIterator[pb.ServerMessage]:
        session: Session | None = None
        try:
            first = await anext(aiter(request_iterator), None)
            _require(first is not None and first.WhichOneof("kind") == "start",
                     grpc.StatusCode.FAILED_PRECONDITION,
                     "the stream must begin with Start; send Start before any Draft or Cancel")
            session = self._open_session(first.start)
            result, queue_ms = await self.worker.run(lambda: session.prefill(self.target))
            yield pb.ServerMessage(started=pb.Started(
                session_id=session.id, first=self._verdict(session, result, queue_ms, batch_tokens=result.tree_size)))
            if first.start.mode == pb.MODE_SERVER_AR:
                async for msg in self._decode_alone(session, request_iterator):
                    yield msg
                return
            while session.finish == pb.FINISH_NONE:
                msg = await anext(aiter(request_iterator), None)
                if msg is None or msg.WhichOneof("kind") == "cancel":
                    session.finish = pb.FINISH_CANCELLED
                    return
                tree = self._check_draft(session, msg)
                result, queue_ms = await self.worker.run(lambda: session.verify(self.target, tree))
                yield pb.ServerMessage(verdict=self._verdict(session, result, queue_ms, len(tree)))
        except BadRequest as bad:
            await context.abort(bad.code, bad.message)
        finally:
            if session is not None:
                self.sessions.pop(session.id, None)
                session.release()

    async def _decode_alone(self, session: Session, request_iterator) -> AsyncIterator[pb.ServerMessage]:
        """Server-only autoregressive decoding: the baseline without a device drafter."""
        cancelled = asyncio.Event()

        async def watch() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("kind") == "cancel":
                    break
            cancelled.set()

        watcher = asyncio.ensure_future(watch())
        try:
            while session.finish == pb.FINISH_NONE and not cancelled.is_set():
                tree = TokenTree.root_only(session.bonus)
                result, queue_ms = await self.worker.run(lambda: session.verify(self.target, tree))
                yield pb.ServerMessage(verdict=self._verdict(session, result, queue_ms, 1))
        finally:
            watcher.cancel()

    def _verdict(self, session: Session, result: RoundResult, queue_ms: float, batch_tokens: int) -> pb.Verdict:
        hidden = b""
        if result.hidden is not None:
            hidden = result.hidden.detach().to("cpu").float().numpy().astype(np.float16).tobytes()
        return pb.Verdict(
            round=session.round, tokens=result.tokens, hidden_state=hidden,
            finish_reason=result.finish,
            timings=pb.ServerTimings(queue_ms=queue_ms, compute_ms=result.compute_ms,
                                     batch_size=1, batch_tokens=batch_tokens),
            next_tree_budget=self.limits.max_tree_nodes,
        )

    # ---- validation --------------------------------------------------------------------
    def _open_session(self, start: pb.Start) -> Session:
        vocab, max_ctx = self.target.vocab_size, self.target.max_context
        _require(len(self.sessions) < self.limits.max_sessions, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 f"server is full ({self.limits.max_sessions} sessions); retry in a few seconds")
        _require(start.tokenizer_fingerprint == self.tokenizer_fingerprint,
                 grpc.StatusCode.FAILED_PRECONDITION,
                 f"tokenizer fingerprint {start.tokenizer_fingerprint or '(empty)'!r} is not this "
                 f"server's ({self.tokenizer_fingerprint}); download tokenizer.json from this server "
                 "(device-client does this by itself) and tokenize with it")
        ids = list(start.prompt_token_ids)
        _require(len(ids) > 0, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty; send at least one token")
        bad = next((t for t in ids if t >= vocab), None)
        _require(bad is None, grpc.StatusCode.INVALID_ARGUMENT,
                 f"prompt token id {bad} is out of range; ids must be < vocab size {vocab}")
        _require(len(ids) < max_ctx, grpc.StatusCode.OUT_OF_RANGE,
                 f"prompt has {len(ids)} tokens but the model's context is {max_ctx}; "
                 f"shorten it to at most {max_ctx - 1} tokens")
        sp = start.sampling
        problem = check_sampling(sp.temperature, sp.top_p, sp.top_k, vocab)
        _require(problem is None, grpc.StatusCode.INVALID_ARGUMENT, problem or "")
        _require(0 < start.max_new_tokens <= self.limits.max_new_tokens, grpc.StatusCode.OUT_OF_RANGE,
                 f"max_new_tokens {start.max_new_tokens} must be in 1..{self.limits.max_new_tokens}")
        bad_stop = next((t for t in start.stop_token_ids if t >= vocab), None)
        _require(bad_stop is None, grpc.StatusCode.INVALID_ARGUMENT,
                 f"stop token id {bad_stop} is out of range; ids must be < vocab size {vocab}")
        stops = set(start.stop_token_ids) | (set() if start.ignore_eos else set(self.eos_ids))
        session = Session(
            prompt_ids=ids,
            params=Sampling(sp.temperature, sp.top_p if sp.top_p > 0 else 1.0, sp.top_k, sp.seed),
            max_new_tokens=start.max_new_tokens, stop_ids=frozenset(stops),
            want_hidden=start.want_hidden_state,
        )
        self.sessions[session.id] = session
        return session

    def _check_draft(self, session: Session, msg: pb.ClientMessage) -> TokenTree:
        kind = msg.WhichOneof("kind")
        _require(kind == "draft", grpc.StatusCode.FAILED_PRECONDITION,
                 f"expected Draft or Cancel after Start, got {kind or 'an empty message'}")
        draft = msg.draft
        _require(draft.round == session.round + 1, grpc.StatusCode.FAILED_PRECONDITION,
                 f"draft round {draft.round} is out of order; the next round is {session.round + 1}")
        n = len(draft.tokens) + 1
        _require(n <= self.limits.max_tree_nodes, grpc.StatusCode.INVALID_ARGUMENT,
                 f"tree has {n} nodes (root included) but this server takes at most "
                 f"{self.limits.max_tree_nodes}; lower --tree-budget")
        vocab = self.target.vocab_size
        bad = next((t for t in draft.tokens if t >= vocab), None)
        _require(bad is None, grpc.StatusCode.INVALID_ARGUMENT,
                 f"draft token id {bad} is out of range; ids must be < vocab size {vocab}")
        try:
            tree = TokenTree.from_wire(session.bonus, draft.tokens, draft.parents)
            tree.check_unique_siblings()
        except TreeError as err:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"bad tree: {err}") from None
        _require(session.committed + tree.max_depth < self.target.max_context,
                 grpc.StatusCode.OUT_OF_RANGE,
                 f"tree depth {tree.max_depth} runs past the context ({self.target.max_context} tokens, "
                 f"{session.committed + 1} used); send a shallower tree")
        return tree
