"""Server-side metrics: per scheduler step and per session, as JSON and for Prometheus.

Two readers with different needs. The load benchmark reads a recent window of steps and
counters since its last reset (GetMetrics with reset), as JSON. A Prometheus server scrapes
`--metrics-port` (or reads GetMetrics.prometheus): counters that only grow over the server's
life, histograms of step time, rows, tokens, queueing and device turnaround, and gauges read at
scrape time (sessions, KV, the load-aware tree budget). Both come from the same events: the
counters once, lifetime totals, with the reset only moving the JSON's baseline. Updated on the
model thread and the gRPC loop, read from the gRPC loop and the scrape thread, under one lock.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "edgespec"
# counters: what Prometheus gets as PREFIX_<key>_total; the *_ms sums and device_waits go to it
# as the histograms' _sum and _count instead
COUNTER_HELP = dict(
    steps="scheduler steps (batched forwards)", rows="rows (sessions) over all steps",
    batch_tokens="tokens over all steps", rounds="verification rounds",
    accepted_tokens="accepted draft tokens", generated_tokens="generated tokens",
    sessions_started="sessions admitted", sessions_rejected="sessions refused (backpressure)",
    sessions_idle_closed="sessions closed for idleness",
    pipelined_steps="steps of pipelined sessions",
    pipelined_steps_with_tree="pipelined steps that verified a (re-rooted) device draft",
    trees_declined="verdicts whose load allowed a tree but whose device's trees did not pay (its link, "
                   "or its yield at the node prices): the server decoded its next round alone",
    prompt_cache_hits="sessions that took whole chunks of their prompt from the prompt cache (or from the "
                      "same chunks being fed for another session)",
    prompt_tokens_from_cache="prompt tokens whose K/V were copied instead of computed (prompt cache)",
    sessions_resumed="sessions that resumed a generation whose stream broke (Start.resume_token_ids)",
    sessions_taken_over="sessions ended by their own resumption before the server noticed their stream "
                        "had broken (Start.resume_session_id)",
    resumed_tokens="tokens such sessions fed again after their prompts")
_COUNTERS = (*COUNTER_HELP, "verify_ms", "device_wait_ms", "device_waits")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_POWERS = tuple(float(1 << k) for k in range(12))  # 1 .. 2048


@dataclass
class StepRecord:
    t: float  # monotonic seconds at the end of the step
    batch_size: int  # rows (sessions) in the forward
    batch_tokens: int
    prefill_tokens: int
    verify_ms: float  # forward + acceptance + KV commit of the whole step
    queue_ms_mean: float  # mean wait of the step's rows since they were ready


@dataclass
class SessionRecord:
    id: str
    mode: str
    rounds: int = 0
    tree_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0
    budget: int = 0  # the tree budget its last verdict handed out


class ServerMetrics:
    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self.steps: deque[StepRecord] = deque(maxlen=window)
        self.sessions: dict[str, SessionRecord] = {}
        self.finished: deque[SessionRecord] = deque(maxlen=256)
        self._totals = {k: 0.0 if k.endswith("_ms") else 0 for k in _COUNTERS}  # over the server's life
        self._baseline = dict(self._totals)  # the totals at the last reset (the JSON counts from there)
        self.device_waits: deque[float] = deque(maxlen=window)
        self.started = time.monotonic()
        self.status: Callable[[], dict] = dict  # the live gauges (sessions, KV, budget); the service sets it
        self.registry = CollectorRegistry()
        self.registry.register(_Live(self))

        def histogram(name: str, help_: str, buckets: tuple) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", help_, buckets=buckets, registry=self.registry)
        self._step_seconds = histogram("step_seconds", "a scheduler step: forward, acceptance and KV commit",
                                       _SECONDS)
        self._step_rows = histogram("step_rows", "rows (sessions) in a step", _POWERS)
        self._step_tokens = histogram("step_tokens", "tokens in a step (trees, decoding steps, prefill)", _POWERS)
        self._queue_seconds = histogram("step_queue_seconds", "mean wait of a step's rows since they were ready",
                                        _SECONDS)
        self._device_wait_seconds = histogram(
            "device_wait_seconds", "a lock-step verdict sent -> that device's next draft in (link + drafting)",
            _SECONDS)
        self._admission_wait_seconds = histogram(
            "admission_wait_seconds", "a stream's Start in -> its session admitted (waiting in line for room)",
            (0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0))

    def step(self, rec: StepRecord) -> None:
        with self._lock:
            self.steps.append(rec)
            self._add(steps=1, batch_tokens=rec.batch_tokens, rows=rec.batch_size, verify_ms=rec.verify_ms)
        self._step_seconds.observe(rec.verify_ms / 1e3)
        self._step_rows.observe(rec.batch_size)
        self._step_tokens.observe(rec.batch_tokens)
        self._queue_seconds.observe(rec.queue_ms_mean / 1e3)

    def device_wait(self, ms: float) -> None:
        """Time from sending a verdict to receiving that device's next draft (network + drafting)."""
        with self._lock:
            self.device_waits.append(ms)
            self._add(device_wait_ms=ms, device_waits=1)
        self._device_wait_seconds.observe(ms / 1e3)

    def admitted(self, waited_s: float) -> None:
        self._admission_wait_seconds.observe(waited_s)

    def session_open(self, sid: str, mode: str) -> None:
        with self._lock:
            self.sessions[sid] = SessionRecord(sid, mode)
            self._add(sessions_started=1)

    def session_round(self, sid: str, tree_tokens: int, accepted: int, generated: int) -> None:
        with self._lock:
            rec = self.sessions.get(sid)
            if rec is None:
                return
            rec.rounds += 1
            rec.tree_tokens += tree_tokens
            rec.accepted_tokens += accepted
            rec.generated_tokens += generated
            self._add(rounds=1, accepted_tokens=accepted, generated_tokens=generated)

    def session_prefilled(self, sid: str, generated: int) -> None:
        """The prompt is in: its last position's logits gave the first token."""
        with self._lock:
            rec = self.sessions.get(sid)
            if rec is not None:
                rec.generated_tokens += generated
                self._add(generated_tokens=generated)

    def session_budget(self, sid: str, budget: int) -> None:
        with self._lock:
            rec = self.sessions.get(sid)
            if rec is not None:
                rec.budget = budget

    def session_close(self, sid: str) -> None:
        with self._lock:
            rec = self.sessions.pop(sid, None)
            if rec is not None:
                self.finished.append(rec)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._add(**{key: n})

    def _add(self, **amounts: float) -> None:
        for key, n in amounts.items():
            self._totals[key] += n

    def totals(self) -> dict[str, float]:
        """Counters over the server's life (what Prometheus sees)."""
        with self._lock:
            return dict(self._totals)

    def reset(self) -> None:
        """Starts the JSON's window and counters afresh; Prometheus's counters keep growing."""
        with self._lock:
            self.steps.clear()
            self.device_waits.clear()
            self.finished.clear()
            self._baseline = dict(self._totals)
            self.started = time.monotonic()

    def snapshot(self, extra: dict | None = None) -> dict:
        with self._lock:
            steps = list(self.steps)
            waits = list(self.device_waits)
            out = dict(counters={k: v - self._baseline[k] for k, v in self._totals.items()},
                       uptime_s=time.monotonic() - self.started,
                       sessions=[asdict(s) for s in self.sessions.values()],
                       finished_sessions=[asdict(s) for s in self.finished])

        def stats(values):
            a = np.asarray(values, dtype=float)
            return dict(mean=float(a.mean()), p50=float(np.percentile(a, 50)),
                        p95=float(np.percentile(a, 95)), max=float(a.max()))
        if steps:
            out["window"] = dict(
                steps=len(steps), batch_size=stats([s.batch_size for s in steps]),
                batch_tokens=stats([s.batch_tokens for s in steps]),
                verify_ms=stats([s.verify_ms for s in steps]),
                queue_ms=stats([s.queue_ms_mean for s in steps]),
                prefill_tokens=int(sum(s.prefill_tokens for s in steps)))
            if waits:
                out["window"]["device_wait_ms"] = stats(waits)
        out.update(extra or {})
        return out

    def to_json(self, extra: dict | None = None) -> str:
        return json.dumps(self.snapshot(extra))

    def prometheus_text(self) -> str:
        """The text exposition a scrape of --metrics-port returns."""
        return generate_latest(self.registry).decode()


class _Live:
    """The counters and the gauges, read when Prometheus scrapes (the histograms register themselves)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        totals = self.metrics.totals()
        for key, help_ in COUNTER_HELP.items():
            yield CounterMetricFamily(f"{PREFIX}_{key}", help_, value=totals[key])
        status = self.metrics.status()
        for key in ("active_sessions", "waiting_sessions", "kv_used_tokens", "kv_budget_tokens",
                    "queued_prefill_tokens", "prompt_cache_tokens"):
            if key in status:
                yield GaugeMetricFamily(f"{PREFIX}_{key}", key.replace("_", " "), value=status[key])
        budget = status.get("budget")
        if budget:
            yield GaugeMetricFamily(f"{PREFIX}_tree_budget", "tree budget the verdicts hand out now (load-aware)",
                                    value=budget["level"])
            prices = GaugeMetricFamily(f"{PREFIX}_node_price", "the chance of acceptance below which the nodes "
                                       "that make a tree up to this size (from half of it) cost more than they "
                                       "yield at the current load (Verdict.node_prices)", labels=["tree_size"])
            for k, price in enumerate(budget["node_prices"]):
                prices.add_metric([str(2 << k)], price)
            yield prices
            rounds = GaugeMetricFamily(f"{PREFIX}_tokens_per_round", "tokens a round of this tree budget yields, "
                                       "learned from which node indices recent rounds accepted", labels=["budget"])
            for level, tokens in budget.get("tokens_per_round", {}).items():
                rounds.add_metric([str(level)], tokens)
            yield rounds
