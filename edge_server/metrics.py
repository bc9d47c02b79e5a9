"""Server-side metrics: per scheduler step and per session, as JSON and Prometheus text.

Steps are kept in a bounded ring (the load benchmark reads the recent window; counters and
sums cover the whole run). Everything is updated on the model thread and read from the gRPC
thread under one lock.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


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
        self.counters = dict(steps=0, batch_tokens=0, rows=0, verify_ms=0.0, rounds=0, accepted_tokens=0,
                             generated_tokens=0, sessions_started=0, sessions_rejected=0,
                             sessions_idle_closed=0, device_wait_ms=0.0, device_waits=0,
                             pipelined_steps=0, pipelined_steps_with_tree=0)
        self.device_waits: deque[float] = deque(maxlen=window)
        self.started = time.monotonic()

    def step(self, rec: StepRecord) -> None:
        with self._lock:
            self.steps.append(rec)
            c = self.counters
            c["steps"] += 1
            c["batch_tokens"] += rec.batch_tokens
            c["rows"] += rec.batch_size
            c["verify_ms"] += rec.verify_ms

    def device_wait(self, ms: float) -> None:
        """Time from sending a verdict to receiving that device's next draft (network + drafting)."""
        with self._lock:
            self.device_waits.append(ms)
            self.counters["device_wait_ms"] += ms
            self.counters["device_waits"] += 1

    def session_open(self, sid: str, mode: str) -> None:
        with self._lock:
            self.sessions[sid] = SessionRecord(sid, mode)
            self.counters["sessions_started"] += 1

    def session_round(self, sid: str, tree_tokens: int, accepted: int, generated: int) -> None:
        with self._lock:
            rec = self.sessions.get(sid)
            if rec is None:
                return
            rec.rounds += 1
            rec.tree_tokens += tree_tokens
            rec.accepted_tokens += accepted
            rec.generated_tokens += generated
            self.counters["rounds"] += 1
            self.counters["accepted_tokens"] += accepted
            self.counters["generated_tokens"] += generated

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
            self.counters[key] += n

    def reset(self) -> None:
        with self._lock:
            self.steps.clear()
            self.device_waits.clear()
            self.finished.clear()
            for key in self.counters:
                self.counters[key] = 0
            self.started = time.monotonic()

    def snapshot(self, extra: dict | None = None) -> dict:
        with self._lock:
            steps = list(self.steps)
            waits = list(self.device_waits)
            out = dict(counters=dict(self.counters), uptime_s=time.monotonic() - self.started,
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


def render_prometheus(snapshot: dict, prefix: str = "edgespec") -> str:
    """Prometheus text exposition (0.0.4) of a snapshot: counters, gauges and window summaries."""
    lines: list[str] = []

    def emit(name: str, kind: str, value, help_: str, labels: str = "") -> None:
        full = f"{prefix}_{name}"
        if not any(line.startswith(f"# TYPE {full} ") for line in lines):
            lines.append(f"# HELP {full} {help_}")
            lines.append(f"# TYPE {full} {kind}")
        lines.append(f"{full}{labels} {float(value):.6g}")

    helps = dict(steps="scheduler steps (batched forwards)", batch_tokens="tokens over all steps",
                 rows="rows over all steps", verify_ms="milliseconds spent in steps",
                 rounds="verification rounds", accepted_tokens="accepted draft tokens",
                 generated_tokens="generated tokens", sessions_started="sessions admitted",
                 sessions_rejected="sessions refused (backpressure)",
                 sessions_idle_closed="sessions closed for idleness",
                 pipelined_steps="steps of pipelined sessions",
                 pipelined_steps_with_tree="pipelined steps that verified a (re-rooted) device draft")
    for key, value in snapshot.get("counters", {}).items():
        emit(f"{key}_total", "counter", value, helps.get(key, key))
    for key in ("active_sessions", "kv_used_tokens", "kv_budget_tokens", "queued_prefill_tokens"):
        if key in snapshot:
            emit(key, "gauge", snapshot[key], key.replace("_", " "))
    for key, stats in snapshot.get("window", {}).items():
        if isinstance(stats, dict):
            for q in ("p50", "p95"):
                emit(f"step_{key}", "summary", stats[q], f"per-step {key} over the recent window",
                     f'{{quantile="{0.5 if q == "p50" else 0.95}"}}')
    budget = snapshot.get("budget")
    if budget:
        emit("tree_budget", "gauge", budget["level"], "tree budget the verdicts hand out now (load-aware)")
        emit("node_price", "gauge", budget["min_node_probability"], "the chance of acceptance below which a "
             "tree node costs more than it yields at the current load (Verdict.min_node_probability)")
        for level, tokens in budget.get("tokens_per_round", {}).items():
            emit("tokens_per_round", "gauge", tokens, "tokens a round of this tree budget yields, learned from "
                 "which node indices recent rounds accepted", f'{{budget="{level}"}}')
    return "\n".join(lines) + "\n"
