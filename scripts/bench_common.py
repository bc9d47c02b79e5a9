"""What the benchmark scripts share: prompts, concurrent device clients, result files.

Methods are compared on the same prompts in the same run. Every method produces the same
tokens, greedy or sampled with the same seed (that is the lossless contract, checked here too),
so tokens/s compare like with like.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import multiprocessing
import os
import queue
import statistics
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from pydoc_data.topics import topics

from device_client.cli import CHANNEL_OPTIONS, load_tokenizer, make_drafter
from device_client.session import Request, generate
from shared.metrics import GenerationRecord
from shared.protocol import pb, rpc

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a Python function that checks whether a number is prime, and explain it.",
    "Explain how a hash map works, with a short example in Python.",
    "List the planets of the solar system with one fact about each.",
    "Write a short email asking a colleague to review a pull request.",
    "Describe the water cycle in four steps.",
    "Give three tips for writing clear documentation.",
    "Translate into French: 'The meeting is moved to Thursday at ten.'",
    "What are the differences between TCP and UDP?",
]
METHODS = ("server-ar", "none", "ngram", "heads", "heads/pipelined")  # DRAFTER/MODE: a drafter in a mode


def with_context(prompt: str, index: int, tokens: int) -> str:
    """`prompt` after about `tokens` tokens of the Python language reference (the topics pydoc
    ships with Python, 4.3 characters a token with SmolLM2's tokenizer), a different slice for
    each prompt index: a document or a chat history sent with the question. Fixed text, so runs
    on other days read the same prompts. On a long context every step's attention reads far more
    keys, and a tree node costs more than on a bare prompt."""
    if tokens <= 0:
        return prompt
    text = _notes()
    chars = min(int(4.3 * tokens), len(text))
    start = index * (len(text) - chars) // len(PROMPTS)
    return f"Here are some notes.\n\n{text[start:start + chars]}\n\nWith those notes at hand: {prompt}"


@functools.cache
def _notes() -> str:
    """The language reference's topics as one line of text, built once a process."""
    return " ".join(" ".join(topics[k] for k in sorted(topics)).split())


def parse_method(method: str) -> tuple[str, str]:
    """'server-ar' | DRAFTER | DRAFTER/MODE -> (drafter, device_client.session mode)."""
    if method == "server-ar":
        return "none", "server-ar"
    drafter, _, mode = method.partition("/")
    return drafter, mode or "speculative"


@dataclass(frozen=True)
class ClientSampling:
    """What the clients ask for (greedy by default). A prompt samples with seed + its CRC-32,
    whichever client sends it, so the lossless check can compare its tokens across runs with
    other numbers of clients."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def prompt_seed(self, prompt: str) -> int:
        return self.seed + zlib.crc32(prompt.encode())


@dataclass
class MethodRun:
    method: str
    clients: int
    wall_s: float
    per_client: list[list[GenerationRecord]]
    starts: list[list[float]]  # perf_counter when each record's request was sent

    @property
    def records(self) -> list[GenerationRecord]:
        return [rec for recs in self.per_client for rec in recs]

    def row(self) -> dict:
        recs = self.records
        tokens = sum(len(r.token_ids) for r in recs)
        rounds = sum(r.rounds for r in recs)
        p50, p95 = [], []
        for client_recs in self.per_client:
            itl = np.concatenate([np.asarray(r.itl_ms) for r in client_recs if r.itl_ms] or [np.zeros(1)])
            p50.append(float(np.percentile(itl, 50)))
            p95.append(float(np.percentile(itl, 95)))
        trees = [s for r in recs for s in r.tree_sizes]
        return {
            "method": self.method, "clients": self.clients, "requests": len(recs), "tokens": tokens,
            "wall_s": self.wall_s, "tokens_per_s": tokens / self.wall_s,
            "tau": (tokens - len(recs)) / rounds if rounds else 0.0,
            "rounds_per_token": rounds / tokens if tokens else 0.0,
            "ttft_ms_p50": statistics.median(r.ttft_ms for r in recs),
            "request_s_p50": statistics.median(r.total_ms for r in recs) / 1e3,  # TTFT + the answer
            "request_s_p95": float(np.percentile([r.total_ms for r in recs], 95)) / 1e3,
            "request_s_max": max(r.total_ms for r in recs) / 1e3,
            "prompt_tokens_mean": statistics.mean(len(r.prompt_token_ids) for r in recs),
            # ITL percentiles per client; the median client's p50 and the worst client's p95
            "itl_ms_p50": statistics.median(p50), "itl_ms_p95": max(p95),
            "tree_mean": float(np.mean(trees)) if trees else 1.0,
            "bytes_up_per_token": sum(r.bytes_up for r in recs) / tokens,
            "bytes_down_per_token": sum(r.bytes_down for r in recs) / tokens,
            "server_ms_per_token": sum(r.server_compute_ms for r in recs) / tokens,
            "draft_ms_per_round": sum(r.draft_ms for r in recs) / rounds if rounds else 0.0,
            "steady_tokens_per_s": self.steady_tokens_per_s(),
            "reconnects": sum(r.reconnects for r in recs),
            "longest_pause_ms": max(r.longest_pause_ms for r in recs),
            "busy_refusals": sum(r.busy_refusals for r in recs),
        }

    def steady_tokens_per_s(self) -> float:
        """Tokens/s while every client is generating: from the last client's first token to the
        first client's last one. A fixed amount of work per client ends with a tail in which
        the clients that drew lower acceptance run alone in small batches; a server under
        steady load has no such tail. 0.0 when the clients never all generate at once."""
        arrivals = []
        for recs, starts in zip(self.per_client, self.starts):
            times = [t0 + (rec.ttft_ms + np.concatenate([[0.0], np.cumsum(rec.itl_ms)])) / 1e3
                     for rec, t0 in zip(recs, starts) if rec.token_ids]
            arrivals.append(np.concatenate(times) if times else np.zeros(0))
        if any(len(a) == 0 for a in arrivals):
            return 0.0
        begin, end = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
        if end <= begin:
            return 0.0
        return sum(int(((a > begin) & (a <= end)).sum()) for a in arrivals) / (end - begin)


def run_clients(address: str, method: str, prompts: list[list[str]], max_new_tokens: int | list[list[int]],
                tree_budget: int, ignore_eos: bool = False, timeout: float = 900.0,
                sampling: ClientSampling | None = None, reconnect_s: float = 0.0) -> MethodRun:
    """One device client per entry of `prompts`, each in its own process with its own channel
    and drafter, all starting together once every client has connected and loaded its
    drafter; each runs its prompts in order. `max_new_tokens`: one length for every request,
    or one per prompt (same shape). `reconnect_s`: how long a client resumes a broken stream
    (0: a break fails the run). A client the server refuses for want of room waits as it asks
    and tries again (busy_refusals counts those), so more clients than --max-sessions queue.

    Processes, not threads: devices draft on their own hardware, in parallel; as threads of
    one process the clients' drafting and gRPC work also queued behind one GIL. They still
    share this machine's cores (split_cores gives them all but the server's), so at 8 clients
    the last tree of a 2-node round reaches the server ~35 ms after the verdicts went out,
    with threads or processes alike (sweeps K and L in results/summary/load.md)."""
    lengths = max_new_tokens if isinstance(max_new_tokens, list) else [[max_new_tokens] * len(ps) for ps in prompts]
    ctx = multiprocessing.get_context("spawn")  # no fork: gRPC's core is not fork-safe
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client, name=f"device-client-{i}",
                         args=(i, address, method, ps, ls, tree_budget, ignore_eos, timeout,
                               sampling or ClientSampling(), reconnect_s, go, results))
             for i, (ps, ls) in enumerate(zip(prompts, lengths, strict=True))]
    for proc in procs:
        proc.start()
    per_client: list[list[GenerationRecord]] = [[] for _ in prompts]
    starts: list[list[float]] = [[] for _ in prompts]
    finished = False
    try:
        unready = set(range(len(procs)))
        while unready:  # every client connected, with its drafter loaded
            kind, index, *done = _receive(results, procs, unready)
            unready.discard(index)
            if kind == "done":  # failed while setting up
                raise RuntimeError(done[-1])
        go.set()
        start = time.perf_counter()
        running = set(range(len(procs)))
        while running:
            _, index, per_client[index], starts[index], error = _receive(results, procs, running)
            running.discard(index)
            if error:
                raise RuntimeError(error)
        wall = time.perf_counter() - start
        finished = True
    except RuntimeError as err:
        raise RuntimeError(f"{method} with {len(prompts)} clients failed: {err}") from None
    finally:
        for proc in procs:
            proc.join(timeout=30 if finished else 0)
            if proc.is_alive():
                proc.kill()
    return MethodRun(method, len(prompts), wall, per_client, starts)


def _receive(results, procs: list, pending: set[int]) -> tuple:
    """The next message from the clients; a client of `pending` that died without a word (a
    signal, not an exception) is an error rather than a wait for ever."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            for i in pending:
                if procs[i].exitcode not in (None, 0):
                    raise RuntimeError(f"client {i} exited with code {procs[i].exitcode}") from None


def _client(index: int, address: str, method: str, prompts: list[str], lengths: list[int], tree_budget: int,
            ignore_eos: bool, timeout: float, sampling: ClientSampling, reconnect_s: float, go, results) -> None:
    """One device client process of run_clients. Sends ("ready", index) once set up, waits for
    `go`, then ("done", index, records, start times, error text or None). perf_counter is the
    system's monotonic clock, so start times compare across processes."""
    recs: list[GenerationRecord] = []
    sent: list[float] = []
    try:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = rpc.EdgeSpecStub(channel)
            info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
            tokenizer = load_tokenizer(stub, info)
            drafter_name, mode = parse_method(method)
            drafter = make_drafter(drafter_name, stub, info)
            requests = [Request(tokenizer.chat_ids(p), max_new_tokens=length,
                                tree_budget=min(tree_budget, info.max_tree_nodes),
                                mode=mode, ignore_eos=ignore_eos, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.prompt_seed(p))
                        for p, length in zip(prompts, lengths, strict=True)]
            results.put(("ready", index))
            go.wait()
            for request in requests:
                sent.append(time.perf_counter())
                recs.append(generate(stub, request, drafter, info.tokenizer_fingerprint, timeout=timeout,
                                     reconnect_s=reconnect_s, busy_wait_s=timeout))  # a full server: wait
    except BaseException as err:  # reported by the parent, with the method named
        results.put(("done", index, recs, sent, f"client {index}: {err!r}\n{traceback.format_exc()}"))
        return
    results.put(("done", index, recs, sent, None))


def split_cores(server_args: list[str], pin: bool = True) -> tuple[list[str], str]:
    """Gives the edge server the first core and this process (the device clients) the rest.

    On one shared box the devices' drafting and gRPC work would otherwise steal the server's
    core; in a deployment they run on their own hardware. Returns the server flags and a line
    for the notes saying what was done."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2 or "--cpus" in server_args:
        shared = ",".join(map(str, cores))
        if len(cores) < 2 and pin:
            print(f"warning: this process may run on core {shared} only, so the server shares it with "
                  "the clients; run without taskset to give the server a core of its own", file=sys.stderr)
        return server_args, f"no core pinning (server and clients share core(s) {shared})"
    os.sched_setaffinity(0, cores[1:])
    rest = ",".join(map(str, cores[1:]))
    return [*server_args, "--cpus", str(cores[0])], f"server pinned to core {cores[0]}, clients to core(s) {rest}"


def lossless_problems(runs: list[MethodRun]) -> list[str]:
    """Every method must give the same tokens for the same prompt (and length): greedy, or
    sampled with the same seed, whose draws depend on the seed and the position only
    (edge_server.sampling; ClientSampling gives a prompt one seed)."""
    seen: dict[tuple, tuple[tuple[int, ...], str]] = {}
    problems = []
    for run in runs:
        for rec in run.records:
            key = (tuple(rec.prompt_token_ids), len(rec.token_ids))
            out, name = tuple(rec.token_ids), f"{run.method} x{run.clients}"
            if key in seen and seen[key][0] != out:
                problems.append(f"{name} produced different tokens than {seen[key][1]}")
            seen.setdefault(key, (out, name))
    return problems


def median_groups(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[dict, list[dict]]]:
    """The rows grouped by the values of `keys` (in the order first seen), each group with its
    row of medians (of every number all its rows have, its key fields as they are) and its rows:
    repeats of a sweep, whose single runs drift on this shared machine."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        med = {k: float(np.median([r[k] for r in rs])) for k, v in rs[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and all(r.get(k) is not None for r in rs)}
        out.append(({**med, **dict(zip(keys, key))}, rs))
    return out


def results_dir(name: str) -> Path:
    out = ROOT / "results" / _dt.date.today().isoformat() / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); a value a row lacks (or None) shows as –."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ("–" if row.get(k) is None else format(row[k], f) if f else str(row[k]) for k, _, f in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2))
