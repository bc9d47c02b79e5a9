"""Continuous batching: one forward per step over the ready work of every session.

Work items: a prompt prefill (fed in chunks), a draft tree to verify, a server-only decode
step (a root-only tree), or a pipelined step, whose tree is taken when the step is built: the
session's latest draft re-rooted at its current token (Session.pipelined_tree). One model
thread loops: apply releases (free KV slots), take the ready
items, build one ragged batch (edge_server.kv_cache), run it, hand each session its result.

Policy
- Trees and decode steps first, oldest first (FIFO = fair: what is left over is oldest next
  step), up to `max_batch_size` rows and `max_batch_tokens` tokens.
- Prefills go in whole chunks of `prefill_chunk` tokens, oldest prompt first. A step that
  carries rounds takes at most one chunk's worth of prompt tokens (one chunk, or several short
  prompts that fit in one), so a long prompt never holds up other sessions' rounds for more
  than one chunk's compute; on a CPU a 128-token chunk costs several decoding steps, and
  filling the step's token room with chunks instead made 8 sessions' rounds wait 1.0-1.2 s
  (p95) while 8 prompts of 1,730 tokens were fed. A step without rounds fills `max_batch_tokens`
  with chunks. One chunk always rides along, even past `max_batch_tokens`, so a busy server
  still admits. Whole chunks, never a load-dependent remainder: a prompt is then cut at the
  same places at any load, and in bf16, where a chunk's numbers depend on where it starts, its
  tokens come out the same however busy the server was.
- Collection window: a device that misses a step waits a whole step, so when fewer sessions
  are ready than are active the step waits for the devices expected back soon. Each session's
  turnaround (verdict out -> next draft in: network + drafting) is tracked, its mean and mean
  deviation; the step waits for those whose mean arrival falls within `recent step ms x
  missing / ready` (waiting w ms for one more row pays while w is below the step time that row
  would otherwise cost), until their mean + LATE_DEVIATIONS deviations within that bound, at
  most `window_max_ms`, and at least `window_ms` for a device with no history yet. (The
  deviation: 8 devices sharing one core answered 5-40 ms after their verdicts, in a different
  order every round; waiting only until each one's mean left 2.2 of 8 rows out of each 2-node
  step, to wait a whole step, and 1.3 with the deviation, at the same throughput and with the
  queueing p95 cut from 104-132 to 16-58 ms: sweep L in results/summary/load.md.) It stops
  as soon as every active session is ready. A lone session never waits for rows. A pipelined
  session is always ready, but a step waits up to half a step for its fresh draft when the
  device's turnaround says it is due by then (a slow link's draft is re-rooted later instead).
- A prompt is fed from the longest run of its whole chunks already computed: kept in the prompt
  cache (edge_server.prompt_cache) once an earlier prompt was in, or fed by a prompt still
  being fed ahead of it, which it then waits for instead of computing the same chunks beside
  it (devices that ask about one document at the same moment). A session that ends before it
  finished (its stream broke) leaves its prompt and generated tokens there, so a resumption of it
  (Start.resume_token_ids) copies them instead of feeding them again. Kept prompts are dropped,
  least recently used first, before a session would be refused for want of KV room.
- Backpressure happens at admission (streams wait in a bounded line for room,
  edge_server.admission, and past it the service refuses with RESOURCE_EXHAUSTED): every
  session has at most one item in flight, so the queue is bounded by the admitted sessions;
  queued prefill tokens are bounded too (a stream whose prompt would pass the bound waits in
  line; `on_room` wakes the line after each step that fed prompt tokens).

Load-aware speculation: `edge_server.budget.BudgetController` picks the tree budget the
verdicts hand out, from the generated tokens/s it measures at each budget and load; every step
reports its rows, tokens and duration (wait included) to it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edge_server.budget import BudgetController
from edge_server.kv_cache import KVBudgetError, KVPool, Row
from edge_server.metrics import ServerMetrics, StepRecord
from edge_server.prompt_cache import Ahead, PromptCache
from edge_server.session import RoundResult, Session
from edge_server.verifier import TargetModel
from shared.protocol import pb
from shared.tree import TokenTree, price_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    max_batch_tokens: int = 512
    prefill_chunk: int = 128
    window_ms: float = 2.0  # wait at least this for a device with no turnaround history
    window_max_ms: float = 50.0
    max_queued_prefill_tokens: int = 16384
    adaptive_budget: bool = True
    prompt_cache_mb: float = 512.0  # KV of prompt prefixes kept for later prompts; 0: none


@dataclass
class StepInfo:
    queue_ms: float
    compute_ms: float
    batch_size: int
    batch_tokens: int


@dataclass
class _Item:
    session: Session
    tree: TokenTree | None  # None: prefill (or a pipelined step until the step takes its tree)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    pipelined: bool = False  # the tree is taken from the session's latest draft at step time
    enqueued: float = field(default_factory=time.perf_counter)
    first_served: float | None = None

    @property
    def prefill(self) -> bool:
        return self.tree is None and not self.pipelined


class Scheduler:
    LATE_DEVIATIONS = 2.0  # a device's turnaround varies: wait for it until mean + this x deviation

    def __init__(self, target: TargetModel, pool: KVPool, config: SchedulerConfig, max_tree_nodes: int,
                 metrics: ServerMetrics | None = None):
        self.target = target
        self.pool = pool
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.budgets = BudgetController(max_tree_nodes, config.adaptive_budget)
        self.prompts = PromptCache(pool, config.prefill_chunk,
                                   int(config.prompt_cache_mb * 2**20 // pool.bytes_per_token))
        self._cv = threading.Condition()
        self._pending: list[_Item] = []
        self._releases: list[Session] = []
        self._active: set[str] = set()
        self._stopping = False
        self.recent_step_ms = 0.0  # EMA of step compute, for the collection window and retry hints
        self.recent_prefill_ms_per_token = 0.0  # EMA over steps that fed prompts, for retry hints
        # called on this thread when KV came free or prompt tokens were fed: streams wait in line for both
        self.on_room: Callable[[], None] | None = None
        self._last_step_end = time.perf_counter()
        self._sent: dict[str, dict[int, float]] = {}  # session -> round -> when its result was handed back
        self._turnaround: dict[str, tuple[float, float]] = {}  # session -> EMAs of the seconds from
        # result to next item and of their deviation
        self._pipelined: set[str] = set()  # sessions whose next step the server itself queues
        self._thread = threading.Thread(target=self._run, name="edgespec-scheduler", daemon=True)
        self._thread.start()

    # ---- called from the asyncio side -------------------------------------------------------
    def admit(self, session: Session, capacity: int) -> None:
        """Reserves the session's KV slot, dropping kept prompts if it needs their room
        (KVBudgetError when the budget is full even so)."""
        with self._cv:
            try:
                session.slot = self.pool.allocate(capacity)
            except KVBudgetError:
                self.prompts.make_room(capacity)
                session.slot = self.pool.allocate(capacity)
            self._active.add(session.id)
            self.budgets.add(session.id, session.speculative, session.tree_cap)
        self.metrics.session_open(session.id, "speculative" if session.speculative else "server-ar")

    def queued_prefill_tokens(self, session: Session | None = None) -> int:
        """Prompt tokens left to compute, with `session`'s as if it were queued next (see
        _queued_prefill)."""
        with self._cv:
            return self._queued_prefill(session)[1]

    def prefill_backlog(self, session: Session) -> int:
        """The prompt tokens queued ahead when `session`'s would take them past
        config.max_queued_prefill_tokens (it waits for them to be fed), else 0; a prompt longer
        than the bound alone gets in once none is queued."""
        with self._cv:
            queued, with_it = self._queued_prefill(session)
        return queued if queued and with_it > self.config.max_queued_prefill_tokens else 0

    def _queued_prefill(self, session: Session | None = None) -> tuple[int, int]:
        """What the queued prompts (and resumed tokens) leave to compute, oldest first, without
        and with `session`'s as if queued next: chunks the prompt cache holds, or a prompt ahead
        has fed or will feed, are not counted, so many devices sending one document are not
        refused for the copies they will not compute."""
        queue = [it.session for it in sorted((i for i in self._pending if i.prefill), key=lambda i: i.enqueued)]
        ahead: list[Ahead] = []
        totals = [0]
        for s in queue + ([session] if session is not None else []):
            totals.append(totals[-1] + s.to_feed - self.prompts.held(s.feed_array, s.prefilled, ahead, s.resumed))
            ahead.append((s.prompt_array, None, s.prefilled))
        return (totals[-2] if session is not None else totals[-1]), totals[-1]

    def release(self, session: Session) -> None:
        """Frees the session's KV on the model thread (between steps); safe at any time."""
        with self._cv:
            self._active.discard(session.id)
            self._releases.append(session)
            self._cv.notify()

    async def prefill(self, session: Session) -> tuple[RoundResult, StepInfo]:
        return await self._submit(session, None)

    async def verify(self, session: Session, tree: TokenTree) -> tuple[RoundResult, StepInfo]:
        return await self._submit(session, tree)

    async def step_pipelined(self, session: Session) -> tuple[RoundResult, StepInfo]:
        """One decoding step that verifies whatever draft the session holds when it runs."""
        return await self._submit(session, None, pipelined=True)

    def offer_draft(self, session: Session, draft_round: int, tree: TokenTree) -> None:
        """A pipelined session's new draft (validated); wakes a step that may be waiting for it."""
        with self._cv:
            session.draft = (draft_round, tree)
            self._arrived(session.id, draft_round - 1, time.perf_counter())
            self._cv.notify()

    def _arrived(self, sid: str, answered_round: int, now: float) -> None:
        """Turnaround (a round's result handed back -> the device's item built on it) for the
        collection window; late drafts of a pipelined session count too, so a link that slows
        down stops holding steps."""
        sent = self._sent.get(sid, {}).pop(answered_round, None)
        if sent is not None:
            took = now - sent
            mean, dev = self._turnaround.get(sid, (took, 0.0))
            self._turnaround[sid] = (0.7 * mean + 0.3 * took, 0.7 * dev + 0.3 * abs(took - mean))

    async def _submit(self, session: Session, tree: TokenTree | None, pipelined: bool = False):
        loop = asyncio.get_running_loop()
        item = _Item(session, tree, loop.create_future(), loop, pipelined)
        with self._cv:
            if pipelined:
                self._pipelined.add(session.id)
            else:
                self._arrived(session.id, session.round, item.enqueued)
            self._pending.append(item)
            self._cv.notify()
        return await item.future

    def next_round(self, session: Session) -> tuple[int, list[float]]:
        """The tree budget for the session's next round and its nodes' prices (call once per
        verdict): the load's level within the device's own cap and the load's node prices
        (BudgetController); budget 1 (no tree: the server decodes the round alone) and no prices
        for server-only sessions, and for devices whose trees lose, by their link or by what they
        yield at those prices (budget.DeviceLink)."""
        with self._cv:
            budget = self._budget(session)
            prices = self.budgets.node_prices()[:price_index(budget) + 1] if budget > 1 else []
            declined = budget > 1 and not session.link.next_round_has_tree(self.recent_step_ms / 1e3, prices)
            if declined:
                budget, prices = 1, []
        self.metrics.session_budget(session.id, budget)
        if declined:
            self.metrics.count("trees_declined")
        return budget, prices

    def _budget(self, session: Session) -> int:
        level = self.budgets.level
        return min(level, session.tree_cap or level) if session.speculative else 1

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def status(self) -> dict:
        with self._cv:
            # the sessions' KV; what the prompt cache holds comes back whenever a session needs it
            return dict(kv_used_tokens=self.pool.used_tokens - self.prompts.tokens,
                        kv_budget_tokens=self.pool.budget_tokens,
                        kv_slots=self.pool.slots - len(self.prompts), queued_prefill_tokens=self._queued_prefill()[0],
                        prompt_cache_tokens=self.prompts.tokens, prompt_cache_entries=len(self.prompts),
                        budget=self.budgets.as_dict())

    # ---- the model thread ---------------------------------------------------------------
    def _apply_releases(self) -> None:
        if not self._releases:
            return
        gone = {s.id for s in self._releases}
        for it in self._pending:
            if it.session.id in gone:
                it.loop.call_soon_threadsafe(_cancel, it.future)
        self._pending = [it for it in self._pending if it.session.id not in gone]
        for s in self._releases:
            self._sent.pop(s.id, None)
            self._turnaround.pop(s.id, None)
            self._pipelined.discard(s.id)
            if s.slot is not None:
                if s.finish in (pb.FINISH_NONE, pb.FINISH_CANCELLED) and not s.cancelled:  # the stream broke:
                    # its device may come back to resume it
                    self.prompts.keep(s.context, s.slot, s.committed, len(s.prompt_ids))
                self.pool.free(s.slot)
            self.budgets.remove(s.id)
            self.metrics.session_close(s.id)
        self._releases.clear()
        if self.on_room is not None:
            self.on_room()

    def _take(self) -> list[tuple[_Item, Row]]:
        cfg = self.config
        chosen: list[tuple[_Item, Row]] = []
        tokens = 0
        for it in self._pending:
            if it.pipelined:
                it.tree = it.session.pipelined_tree(self._budget(it.session))
        for it in sorted((i for i in self._pending if not i.prefill), key=lambda i: i.enqueued):
            if len(chosen) >= cfg.max_batch_size or (chosen and tokens + len(it.tree) > cfg.max_batch_tokens):
                break
            chosen.append((it, it.session.tree_row(it.tree)))
            tokens += len(it.tree)
        room = cfg.prefill_chunk if chosen else cfg.max_batch_tokens  # see the module docstring
        prefill_tokens = 0
        ahead: list[Ahead] = []  # prompts fed before the next one
        for it in sorted((i for i in self._pending if i.prefill), key=lambda i: i.enqueued):
            if len(chosen) >= cfg.max_batch_size:
                break
            if self._fed_elsewhere(it.session, ahead):
                continue
            row = it.session.prefill_row(cfg.prefill_chunk)  # whole chunks: see the module docstring
            if prefill_tokens and (prefill_tokens + row.n > room or tokens + row.n > cfg.max_batch_tokens):
                break
            chosen.append((it, row))
            tokens += row.n
            prefill_tokens += row.n
        return chosen

    def _fed_elsewhere(self, s: Session, ahead: list[Ahead]) -> bool:
        """Takes what the prompt cache, or a prompt fed ahead of this one, already holds of the
        session's prompt; True while one of those prompts will feed the chunk this one would feed
        next (it waits rather than compute that chunk twice)."""
        fed, wait = self.prompts.restore(s.feed_array, s.slot, s.prefilled, ahead, s.resumed)
        if fed > s.prefilled:
            if not s.prompt_cached:
                self.metrics.count("prompt_cache_hits")
            self.metrics.count("prompt_tokens_from_cache", fed - s.prefilled)
            s.prompt_cached += fed - s.prefilled
            s.prefilled = s.committed = fed
        ahead.append((s.prompt_array, s.slot, s.prefilled))
        return wait

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._pending and not self._releases and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    for it in self._pending:
                        it.loop.call_soon_threadsafe(_cancel, it.future)
                    return
                self._apply_releases()
                if not self._pending:
                    continue
                deadline = self._collection_deadline()
                while self._incomplete() and not self._releases:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                self._apply_releases()
                batch = self._take()
                if not batch:
                    continue
            self._step(batch)

    def _late(self) -> tuple[list[str], list[str]]:
        """Sessions without a pending item, and pipelined ones whose draft for this round is
        not in yet (none is worth waiting for at budget 1)."""
        ready = {it.session.id for it in self._pending}
        missing = [sid for sid in self._active if sid not in ready]
        drafting = [it.session.id for it in self._pending
                    if it.pipelined and self._budget(it.session) > 1
                    and (it.session.draft is None or it.session.draft[0] <= it.session.round)]
        return missing, drafting

    def _incomplete(self) -> bool:
        missing, drafting = self._late()
        return bool(missing or drafting)

    def _collection_deadline(self) -> float:
        """When to stop waiting for more ready sessions or fresh drafts (see the module docstring).

        A missing row is worth up to `step ms x missing / ready` of waiting; a pipelined
        session's fresh draft (instead of a stale or no tree) up to half a step."""
        now = time.perf_counter()
        cfg = self.config
        missing, drafting = self._late()
        if not missing and not drafting:
            return now
        ready = len(self._pending)
        bounds = {sid: self.recent_step_ms * len(missing) / max(1, ready) for sid in missing}
        bounds.update({sid: self.recent_step_ms / 2 for sid in drafting})
        wait = cfg.window_ms / 1e3
        for sid, bound_ms in bounds.items():
            bound = min(cfg.window_max_ms, bound_ms) / 1e3
            sent, turnaround = self._sent.get(sid), self._turnaround.get(sid)
            if sid in self._pipelined and sid in missing:
                wait = max(wait, bound)  # the server requeues it itself, within a moment: hold the step
            elif sent and turnaround is not None:
                mean, dev = turnaround
                due = sent[max(sent)] + mean - now
                if due <= bound:
                    wait = max(wait, min(due + self.LATE_DEVIATIONS * dev + cfg.window_ms / 1e3, bound))
        return now + wait

    def _step(self, batch: list[tuple[_Item, Row]]) -> None:
        started = time.perf_counter()
        rows = [row for _, row in batch]
        n_tokens = sum(r.n for r in rows)
        for it, _ in batch:
            if it.first_served is None:
                it.first_served = started
        try:
            logits, hidden = self.target.forward_rows(rows)
            results: list = []
            for (it, row), lg, hd in zip(batch, logits, hidden):
                s = it.session
                if it.prefill:
                    results.append(s.after_prefill_row(row, lg, hd, self.target.max_context, started))
                else:
                    results.append(s.after_tree_row(it.tree, lg, hd, self.target.max_context, started))
        except Exception as err:  # a bug or OOM: fail this step's sessions, keep serving others
            log.exception("scheduler step failed")
            with self._cv:
                for it, _ in batch:
                    self._pending.remove(it)
                    it.loop.call_soon_threadsafe(_fail, it.future, err)
            return
        ended = time.perf_counter()
        compute_ms = (ended - started) * 1e3
        self.recent_step_ms = 0.8 * self.recent_step_ms + 0.2 * compute_ms
        prefill_tokens = sum(row.n for (it, row) in batch if it.prefill)
        if prefill_tokens:
            per_token = compute_ms / n_tokens
            self.recent_prefill_ms_per_token = 0.8 * self.recent_prefill_ms_per_token + 0.2 * per_token
            if self.on_room is not None:  # the queued prompts shrank
                self.on_room()
        queue = []
        with self._cv:
            rounds = [(res.tree_size, res.path) for (it, _), res in zip(batch, results) if not it.prefill]
            self.budgets.observe_step(rounds, ended - self._last_step_end, ended - started, prefill=prefill_tokens > 0)
            self._last_step_end = ended
            for (it, row), res in zip(batch, results):
                if res is None:
                    continue  # a prefill with chunks to go stays pending
                self._pending.remove(it)
                queue_ms = (it.first_served - it.enqueued) * 1e3
                queue.append(queue_ms)
                if it.pipelined:
                    self.metrics.count("pipelined_steps")
                    self.metrics.count("pipelined_steps_with_tree", int(len(it.tree) > 1))
                if it.prefill:
                    self.metrics.session_prefilled(it.session.id, len(res.tokens))
                    self.prompts.keep(it.session.prompt_array, it.session.slot, it.session.prefilled)
                else:
                    self.metrics.session_round(it.session.id, len(it.tree), res.accepted, len(res.tokens))
                info = StepInfo(queue_ms, compute_ms, len(rows), n_tokens)
                if res.finish != pb.FINISH_NONE:
                    self._pipelined.discard(it.session.id)  # no next step to hold a batch for
                else:
                    sent = self._sent.setdefault(it.session.id, {})
                    sent[it.session.round] = time.perf_counter()
                    for old in [r for r in sent if r < it.session.round - 8]:
                        del sent[old]  # a device this far behind answers no round it could still use
                it.loop.call_soon_threadsafe(_resolve, it.future, (res, info))
        self.metrics.step(StepRecord(time.monotonic(), len(rows), n_tokens, prefill_tokens, compute_ms,
                                     float(np.mean(queue)) if queue else 0.0))


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, err: Exception) -> None:
    if not fut.done():
        fut.set_exception(err)


def _cancel(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.cancel()
