"""The gRPC service: validates what devices send, runs sessions, streams verdicts.

Every bad input is answered with a gRPC status whose message says what to change; the failed
session is freed and every other session keeps running.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import numpy as np

from edge_server.admission import AdmissionLine
from edge_server.artifacts import ArtifactStore
from edge_server.kv_cache import KVBudgetError
from edge_server.sampling import Sampling, check_sampling
from edge_server.scheduler import Scheduler, StepInfo
from edge_server.session import RoundResult, Session
from edge_server.verifier import TargetModel
from shared.protocol import RETRY_AFTER_MS, pb, rpc
from shared.tree import TokenTree, TreeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_tree_nodes: int = 128
    max_new_tokens: int = 4096
    max_sessions: int = 64
    idle_timeout_s: float = 120.0
    max_waiting: int = 256  # streams waiting in line for room (edge_server.admission)
    admission_wait_s: float = 30.0


@dataclass
class _Uplink:
    """What the device's message reader (EdgeSpecService._watch) shares with the round loop."""
    due: bool  # lock-step: a Draft is due for the next round
    drafts: asyncio.Queue = field(default_factory=asyncio.Queue)  # lock-step: due trees; None = ended
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # Cancel, end of stream or a bad message
    refused: BadRequest | None = None


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # a busy server: when trying again may succeed

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        return () if self.retry_after_s is None else ((RETRY_AFTER_MS, str(round(self.retry_after_s * 1e3))),)


def _require(ok: bool, code: grpc.StatusCode, message: str) -> None:
    if not ok:
        raise BadRequest(code, message)


def _log_end(session: Session, peer: str, seconds: float) -> None:
    """One line a session, for an operator following who got what (finish NONE: the device
    left, or its stream broke, before the answer was done)."""
    rounds = len(session.round_ends) - 1
    fresh = len(session.generated) - session.resumed
    log.info("session %s from %s: %s, prompt %d tokens (%d from the cache)%s, %d tokens in %d rounds "
             "after the first, finish %s, %.2f s", session.id, peer,
             "speculative" if session.speculative else "server-ar", len(session.prompt_ids), session.prompt_cached,
             f", resumed after {session.resumed}" if session.resumed else "", fresh, rounds,
             pb.FinishReason.Name(session.finish).removeprefix("FINISH_"), seconds)


class EdgeSpecService(rpc.EdgeSpecServicer):
    def __init__(self, target: TargetModel, model_name: str, model_fingerprint: str,
                 eos_ids: list[int], artifacts: ArtifactStore, tokenizer_fingerprint: str,
                 limits: Limits, version: str, scheduler: Scheduler):
        """`scheduler` runs the model (its KV pool and metrics are the service's too)."""
        self.target = target
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.eos_ids = eos_ids
        self.artifacts = artifacts
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.limits = limits
        self.version = version
        self.scheduler, self.pool, self.metrics = scheduler, scheduler.pool, scheduler.metrics
        self.sessions: dict[str, Session] = {}
        # every Generate running, admitted or in line, and why the server ended it (None: it did not)
        self._streams: dict[asyncio.Task, tuple[grpc.StatusCode, str] | None] = {}
        self._stream_of: dict[str, asyncio.Task] = {}  # an admitted session's Generate
        self.draining = False  # stopping: no new streams (edge_server.cli.drain)
        self.line = AdmissionLine(limits.max_waiting, limits.admission_wait_s)
        self.scheduler.on_room = self.line.room_freed_threadsafe
        self.metrics.status = self.status

    def status(self) -> dict:
        """The live state the metrics report: sessions, KV use, queued prefill, the budget."""
        return dict(active_sessions=len(self.sessions), waiting_sessions=len(self.line), **self.scheduler.status())

    def close_streams(self) -> None:
        """Ends every stream with UNAVAILABLE, saying why: on shutdown, before gRPC would cancel
        them (which it logs as an error) and leave the devices guessing. They resume the
        generation elsewhere or once the server is back."""
        for task in self._streams:
            self._end_stream(task, grpc.StatusCode.UNAVAILABLE, "the edge server is shutting down; resume the "
                             "generation (Start.resume_token_ids) once it is back or on another server")

    GOING_AWAY = ("the edge server is shutting down; start the generation on another server, or on this one "
                  "once it is back")

    def drain(self) -> None:
        """Stopping: new streams are turned away and those not admitted yet (waiting in line) are
        ended, while the running sessions go on."""
        self.draining = True
        admitted = set(self._stream_of.values())
        for task in self._streams:
            if task not in admitted:
                self._end_stream(task, grpc.StatusCode.UNAVAILABLE, self.GOING_AWAY)

    def _end_stream(self, task: asyncio.Task, code: grpc.StatusCode, message: str) -> None:
        """Cancels a Generate, which then ends its stream with this status (edge_server.service.Generate)."""
        self._streams[task] = (code, message)
        task.cancel()

    def shutdown(self) -> None:
        self.scheduler.stop()

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

    async def GetMetrics(self, request, context) -> pb.ServerMetrics:
        status = self.status()
        snap = self.metrics.snapshot(status)
        if request.reset:
            self.metrics.reset()
        return pb.ServerMetrics(json=json.dumps(snap), prometheus=self.metrics.prometheus_text(),
                                active_sessions=status["active_sessions"], kv_used_tokens=status["kv_used_tokens"],
                                kv_budget_tokens=status["kv_budget_tokens"])

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
        # the peer now: asked once the call is over (a device gone), gRPC dereferences a freed call
        task, opened, peer = asyncio.current_task(), time.perf_counter(), context.peer()
        self._streams[task] = None
        try:
            _require(not self.draining, grpc.StatusCode.UNAVAILABLE, self.GOING_AWAY)
            first = await anext(aiter(request_iterator), None)
            _require(first is not None and first.WhichOneof("kind") == "start",
                     grpc.StatusCode.FAILED_PRECONDITION,
                     "the stream must begin with Start; send Start before any Draft or Cancel")
            session, capacity = self._new_session(first.start)
            await self._end_broken(session, first.start.resume_session_id)
            async with aclosing(self._admit_in_line(session, capacity)) as places:
                async for ahead in places:
                    if first.start.report_waiting:
                        yield pb.ServerMessage(waiting=pb.Waiting(ahead=ahead))
            self._stream_of[session.id] = task
            result, step = await self.scheduler.prefill(session)
            verdict = self._verdict(session, result, step)
            yield pb.ServerMessage(started=pb.Started(session_id=session.id, first=verdict,
                                                      cached_prompt_tokens=session.prompt_cached))
            async for msg in self._rounds(session, first.start.mode, verdict.next_tree_budget, request_iterator):
                yield msg
        except BadRequest as bad:
            log.info("refused a stream from %s: %s: %s", peer, bad.code.name, bad.message)
            await context.abort(bad.code, bad.message, bad.trailers)
        except asyncio.CancelledError:
            if self._streams[task] is None:
                raise  # the device went away
            await context.abort(*self._streams[task])
        finally:  # an admitted session, also one whose device left while it was being admitted
            del self._streams[task]
            if session is not None and self.sessions.pop(session.id, None) is not None:
                self._stream_of.pop(session.id, None)
                self.scheduler.release(session)
                session.release()
                self.line.room_freed()
                _log_end(session, peer, time.perf_counter() - opened)

    async def _rounds(self, session: Session, mode: int, budget: int,
                      request_iterator) -> AsyncIterator[pb.ServerMessage]:
        """Every round after the prefill, batched with everything else by the scheduler.

        Lock-step: after a verdict with a budget above 1 the server waits for the device's tree
        for the next round; after one with budget 1 (no speculation: the load is too high for
        trees to pay, the device's link too slow, or its cap 1) it decodes the next round
        alone, as server-only decoding does, so no round trip is spent on a tree nobody drafts.
        Pipelined: the server never waits; each step verifies the device's latest draft,
        re-rooted at the current token. Server-only: the server decodes alone."""
        lock_step = mode == pb.MODE_SPECULATIVE
        uplink = _Uplink(due=lock_step and budget > 1)
        watcher = asyncio.ensure_future(self._watch(session, mode, request_iterator, uplink))
        try:
            while session.finish == pb.FINISH_NONE and not uplink.ended.is_set():
                if mode == pb.MODE_PIPELINED:
                    result, step = await self.scheduler.step_pipelined(session)
                    if result.tree_size > 1:
                        session.link.tree_round(None, result.tree_size, len(result.tokens))
                elif lock_step and budget > 1:
                    tree, answer_s = await self._due_draft(uplink.drafts)
                    if tree is None:
                        break
                    result, step = await self.scheduler.verify(session, tree)
                    session.link.tree_round(answer_s, len(tree), len(result.tokens))
                else:
                    result, step = await self.scheduler.verify(session, TokenTree.root_only(session.bonus))
                verdict = self._verdict(session, result, step)
                budget = verdict.next_tree_budget
                # set before the verdict goes out: a fast device's Draft may arrive right after it
                uplink.due = lock_step and budget > 1 and session.finish == pb.FINISH_NONE
                yield pb.ServerMessage(verdict=verdict)
            if uplink.refused:
                raise uplink.refused
            if session.finish == pb.FINISH_NONE:
                session.finish = pb.FINISH_CANCELLED
        finally:
            watcher.cancel()

    async def _watch(self, session: Session, mode: int, request_iterator, uplink: _Uplink) -> None:
        """Reads the device's messages on the side, so a Cancel, a disconnect or a bad Draft ends
        the session whichever round it is in: lock-step Drafts go to `uplink.drafts` when one is
        due, pipelined ones to the scheduler."""
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "cancel":
                    session.cancelled = True  # done with it: nothing to keep for a resumption
                if kind == "cancel" or session.finish != pb.FINISH_NONE:
                    break
                _require(kind == "draft", grpc.StatusCode.FAILED_PRECONDITION,
                         f"expected Draft or Cancel after Start, got {kind or 'an empty message'}")
                if mode == pb.MODE_PIPELINED:
                    self.scheduler.offer_draft(session, *self._check_draft(session, msg.draft, pipelined=True))
                    continue
                _require(uplink.due, grpc.StatusCode.FAILED_PRECONDITION,
                         "no Draft is due: a server-only session takes none, and in lock-step the server "
                         "decodes alone after a verdict whose next_tree_budget is 1; send one Draft after "
                         "each verdict with a budget above 1")
                uplink.drafts.put_nowait(self._check_draft(session, msg.draft)[1])
                uplink.due = False
        except BadRequest as bad:
            uplink.refused = bad
        uplink.ended.set()
        uplink.drafts.put_nowait(None)

    async def _due_draft(self, drafts: asyncio.Queue) -> tuple[TokenTree | None, float]:
        """The device's tree for the round the server waits for (None once the stream ends) and
        the seconds it took; an idle device loses its session (and its KV) after the timeout."""
        sent = time.perf_counter()
        try:
            tree = await asyncio.wait_for(drafts.get(), self.limits.idle_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.count("sessions_idle_closed")
            raise BadRequest(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no Draft for {self.limits.idle_timeout_s:g} s; the session and its KV cache "
                             "were freed; start a new generation") from None
        waited = time.perf_counter() - sent
        self.metrics.device_wait(waited * 1e3)
        return tree, waited

    def _verdict(self, session: Session, result: RoundResult, step: StepInfo) -> pb.Verdict:
        budget, prices = self.scheduler.next_round(session)
        hidden = b""
        if result.hidden is not None and budget > 1:  # drafts are made only for budgets above 1
            hidden = result.hidden.detach().to("cpu").float().numpy().astype(np.float16).tobytes()
        return pb.Verdict(
            round=session.round, tokens=result.tokens, hidden_state=hidden,
            finish_reason=result.finish,
            timings=pb.ServerTimings(queue_ms=step.queue_ms, compute_ms=step.compute_ms,
                                     batch_size=step.batch_size, batch_tokens=step.batch_tokens),
            next_tree_budget=budget, node_prices=prices,
        )

    async def _end_broken(self, resuming: Session, broken_id: str) -> None:
        """Ends the session a resumption names if it still runs: its device's connection went
        quiet without a reset (a changed network), which keepalive pings tell the server only
        seconds later, and meanwhile it would hold a slot and KV (a full server would make the
        resumption wait for its own old session) and, pipelined or server-only, decode into the
        void. Ended like a broken stream, it leaves what it computed in the prompt cache, which
        the resumption then copies."""
        task = self._stream_of.get(broken_id)
        if task is None:
            return
        broken = self.sessions[broken_id]
        _require(broken.prompt_ids == resuming.prompt_ids
                 and broken.generated[:resuming.resumed] == resuming.generated[:resuming.resumed],
                 grpc.StatusCode.INVALID_ARGUMENT,
                 f"resume_session_id {broken_id} names a session with another prompt or other tokens; "
                 "send the session_id of the stream this one resumes, with its prompt and the tokens it delivered")
        self._end_stream(task, grpc.StatusCode.ABORTED, "a resumption of this generation (resume_session_id) "
                         "took it over")
        await asyncio.wait([task])  # its clean-up has released the session (edge_server.scheduler keeps its KV)
        self.metrics.count("sessions_taken_over")

    # ---- validation --------------------------------------------------------------------
    async def _admit_in_line(self, session: Session, capacity: int) -> AsyncIterator[int]:
        """Admits the session once there is room for it, waiting in line for it, or refuses it;
        while it waits, yields how many streams wait ahead of it whenever that changes."""
        entered = time.perf_counter()
        places: asyncio.Queue[int | None] = asyncio.Queue()
        entering = asyncio.ensure_future(self.line.enter(lambda: self._admit(session, capacity),
                                                         resumed=session.resumed > 0, moved=places.put_nowait))
        entering.add_done_callback(lambda _: places.put_nowait(None))
        try:
            while (ahead := await places.get()) is not None:
                yield ahead
            why = entering.result()
        finally:
            entering.cancel()  # the device went away while it waited: it leaves the line
        if why is not None:
            self._busy(why, self._retry_after_s(session))
        self.metrics.admitted(time.perf_counter() - entered)
        if session.resumed:
            self.metrics.count("sessions_resumed")
            self.metrics.count("resumed_tokens", session.resumed)

    def _admit(self, session: Session, capacity: int) -> str | None:
        """Admits the session if a slot and its KV are free and its prompt would not pass the
        queued prefill bound (None), else says which is not."""
        if len(self.sessions) >= self.limits.max_sessions:
            return f"server is full ({self.limits.max_sessions} sessions)"
        if queued := self.scheduler.prefill_backlog(session):
            return f"{queued} prompt tokens are waiting for prefill"
        try:
            self.scheduler.admit(session, capacity)
        except KVBudgetError as err:
            return str(err)
        self.sessions[session.id] = session
        return None

    def _new_session(self, start: pb.Start) -> tuple[Session, int]:
        """The session a Start asks for and the KV positions it needs, or BadRequest."""
        vocab, max_ctx = self.target.vocab_size, self.target.max_context
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
        resumed = self._check_resumed(start, stops)
        session = Session(
            prompt_ids=ids,
            params=Sampling(sp.temperature, sp.top_p if sp.top_p > 0 else 1.0, sp.top_k, sp.seed),
            max_new_tokens=start.max_new_tokens, stop_ids=frozenset(stops),
            want_hidden=start.want_hidden_state, speculative=start.mode != pb.MODE_SERVER_AR,
            tree_cap=min(start.tree_budget or self.limits.max_tree_nodes, self.limits.max_tree_nodes),
            generated=resumed, resumed=len(resumed),
        )
        capacity = min(len(ids) + start.max_new_tokens, max_ctx) + self.limits.max_tree_nodes
        room = self.pool.budget_tokens - self.limits.max_tree_nodes - len(ids)
        _require(capacity <= self.pool.budget_tokens, grpc.StatusCode.OUT_OF_RANGE,
                 f"this session needs {capacity} KV positions (prompt {len(ids)} + max_new_tokens "
                 f"{start.max_new_tokens} + a tree of {self.limits.max_tree_nodes}) but the server's whole KV "
                 f"budget holds {self.pool.budget_tokens}, so it would never fit; "
                 + (f"lower max_new_tokens to at most {room}" if room > 0 else "shorten the prompt"))
        return session, capacity

    def _check_resumed(self, start: pb.Start, stops: set[int]) -> list[int]:
        """The tokens a broken stream delivered, which this one resumes after: they must be
        a generation that had not finished."""
        resumed = list(start.resume_token_ids)
        vocab, max_ctx = self.target.vocab_size, self.target.max_context
        bad = next((t for t in resumed if t >= vocab), None)
        _require(bad is None, grpc.StatusCode.INVALID_ARGUMENT,
                 f"resume token id {bad} is out of range; ids must be < vocab size {vocab}")
        _require(len(resumed) < start.max_new_tokens, grpc.StatusCode.OUT_OF_RANGE,
                 f"resume_token_ids has {len(resumed)} tokens and max_new_tokens is {start.max_new_tokens}, "
                 "so nothing is left to generate; max_new_tokens counts the resumed tokens: send the "
                 "first stream's")
        _require(len(start.prompt_token_ids) + len(resumed) < max_ctx, grpc.StatusCode.OUT_OF_RANGE,
                 f"prompt and resumed tokens ({len(start.prompt_token_ids)} + {len(resumed)}) fill the "
                 f"model's context ({max_ctx}): that generation had finished")
        at = next((i for i, t in enumerate(resumed) if t in stops), None)
        if at is not None:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"resume_token_ids[{at}] = {resumed[at]} is a stop token, so that generation had "
                             "finished there; resume only one that had not")
        return resumed

    RETRY_S = (0.2, 10.0)  # the retry hint's bounds: no tighter polling, no longer blind wait

    def _busy(self, why: str, wait_s: float) -> None:
        """Backpressure: RESOURCE_EXHAUSTED, with when to try again in the message for people and
        in the trailing metadata (RETRY_AFTER_MS) for clients, which wait that long and retry."""
        self.metrics.count("sessions_rejected")
        wait_s = min(max(wait_s, self.RETRY_S[0]), self.RETRY_S[1])
        raise BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry in about {wait_s:.1f} s", wait_s)

    def _retry_after_s(self, session: Session) -> float:
        """When to ask again: once the queued prompts are fed, when they are what keeps the
        session out; else when the first session would end if it runs to max_new_tokens at its
        acceptance so far and the recent step time: its slot and KV come free then at the latest
        (a stop token frees them sooner, so the hint is capped)."""
        if queued := self.scheduler.prefill_backlog(session):
            return queued * self.scheduler.recent_prefill_ms_per_token / 1e3
        rounds = min((s.rounds_left for s in self.sessions.values()), default=0.0)
        return rounds * self.scheduler.recent_step_ms / 1e3

    def _check_draft(self, session: Session, draft: pb.Draft, pipelined: bool = False) -> tuple[int, TokenTree]:
        """The draft's round and its tree, rooted at the last token of the verdict it was built on."""
        newest = len(session.round_ends)  # rounds with a verdict out (the prefill's included) + 1
        if pipelined:
            last = session.draft[0] if session.draft else 0
            _require(draft.round <= newest, grpc.StatusCode.FAILED_PRECONDITION,
                     f"draft round {draft.round} is ahead of the server (its latest verdict is round "
                     f"{newest - 1}); build each draft on a verdict you received and send that round + 1")
            _require(draft.round > last, grpc.StatusCode.FAILED_PRECONDITION,
                     f"draft round {draft.round} is out of order; the previous draft was round {last}")
        else:
            _require(draft.round == newest, grpc.StatusCode.FAILED_PRECONDITION,
                     f"draft round {draft.round} is out of order; the next round is {newest}")
        n = len(draft.tokens) + 1
        _require(n <= self.limits.max_tree_nodes, grpc.StatusCode.INVALID_ARGUMENT,
                 f"tree has {n} nodes (root included) but this server takes at most "
                 f"{self.limits.max_tree_nodes}; lower --tree-budget")
        vocab = self.target.vocab_size
        bad = next((t for t in draft.tokens if t >= vocab), None)
        _require(bad is None, grpc.StatusCode.INVALID_ARGUMENT,
                 f"draft token id {bad} is out of range; ids must be < vocab size {vocab}")
        try:
            tree = TokenTree.from_wire(session.root_for_round(draft.round), draft.tokens, draft.parents)
            tree.check_unique_siblings()
        except TreeError as err:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"bad tree: {err}") from None
        # KV positions in use when the root was the last token (re-rooting keeps depth + position)
        committed = len(session.prompt_ids) + session.round_ends[draft.round - 1] - 1
        _require(committed + tree.max_depth < self.target.max_context,
                 grpc.StatusCode.OUT_OF_RANGE,
                 f"tree depth {tree.max_depth} runs past the context ({self.target.max_context} tokens, "
                 f"{committed + 1} used); send a shallower tree")
        return draft.round, tree
