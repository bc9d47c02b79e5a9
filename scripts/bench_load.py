"""Load benchmark: N concurrent device clients on loopback against one batching edge server.

For N in --clients (default 1 2 4 8 16) and every method (server-ar, none, ngram, heads), all
N clients start together, each runs --requests generations of exactly --max-new-tokens tokens
(--ignore-eos, so methods do the same work; --length-spread varies the length per request, the
same for every method) over a fixed prompt set (--context-tokens puts a long document before
each), and the run records total
tokens/s, per-client inter-token latency p50/p95, and the server's per-step batch statistics
(GetMetrics, reset between runs). Methods run back to back at each N, and their tokens/s are
reported as ratios to server-ar at the same N; with --repeats R the whole sweep runs R times
and the table shows medians, since one run's ratio drifts 10-15% on this shared machine.
The outputs of all methods are checked to be identical (lossless): greedy, or with
--temperature sampled with a seed per prompt, whose draws depend on the seed and the position
only, so speculation must reproduce server-only decoding's sample token for token.

Two throughputs: tokens/s over the whole run (prefills and the tail included), and steady
tokens/s while all N clients are generating (see bench_common.MethodRun.steady_tokens_per_s).
Every (N, method) gets a fresh server (unless --server), so what the load-aware budget learned
from another method's sessions is not carried over; before the timed run an untimed round at
the same N and method (--warmup-tokens) lets it measure its tree budgets for that load, as a
server that has been serving that mix would have. The servers it starts keep no prompts
(--prompt-cache-mb 0): the warm-up sends the timed prompts, whose prefill would otherwise be
skipped (scripts/bench_prompt_cache.py measures that); a --server keeps its own setting.

Writes results/<date>/load/{results.json, table.md, tokens_per_s.png}.

    .venv/bin/python scripts/bench_load.py
    .venv/bin/python scripts/bench_load.py --clients 1 8 --methods server-ar ngram --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_common import (PROMPTS, ClientSampling, MethodRun, lossless_problems, markdown_table,  # noqa: E402
                          median_groups, parse_method, results_dir, run_clients, save_json, split_cores,
                          with_context)

from device_client.cli import make_drafter  # noqa: E402
from edge_server.launcher import ServerProcess  # noqa: E402
from shared.protocol import pb, rpc  # noqa: E402

COLUMNS = [("clients", "N", "d"), ("method", "method", ""), ("tokens_per_s", "tok/s", ".1f"),
           ("vs_server_ar", "× server-ar", ".2f"), ("steady_tokens_per_s", "steady tok/s", ".1f"),
           ("steady_vs_server_ar", "steady ×", ".2f"), ("tau", "τ", ".2f"), ("budget_level", "budget", ""),
           ("first_node_price", "price node 2", ".2f"), ("last_node_price", "price last node", ".2f"),
           ("itl_ms_p50", "ITL p50 ms", ".1f"),
           ("itl_ms_p95", "ITL p95 ms", ".1f"), ("ttft_ms_p50", "TTFT p50 ms", ".0f"),
           ("request_s_p50", "request s p50", ".1f"),
           ("batch_size_mean", "batch rows", ".1f"), ("batch_tokens_mean", "batch tok", ".1f"),
           ("verify_ms_p50", "step ms p50", ".1f"), ("queue_ms_p50", "queue ms p50", ".1f"),
           ("tree_mean", "tree nodes", ".1f"), ("busy_refusals", "refused", "g")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=["server-ar", "none", "ngram", "heads", "heads/pipelined"],
                   help="server-ar, or a drafter (none, ngram, heads) with an optional /MODE (pipelined)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=1, help="generations per client at each N")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="each request asks for max-new-tokens x (1 + s u), u uniform in [-1, 1], drawn once per "
                        "(client, request) and the same for every method and repeat (0: all the same length, "
                        "so the clients stay in step, as devices that all start at once and never stop would)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every (N, method) this many times, the methods interleaved; each run is divided by "
                        "the server-ar run of its own repeat, and the table shows the medians (with the ratio's "
                        "range): one run's ratio moves 10-15%% with nothing changed on this shared machine")
    p.add_argument("--context-tokens", type=int, default=0,
                   help="put about this many tokens of notes before every prompt (slices of the "
                        "Python language reference, one per prompt): long-context serving, a document "
                        "or a chat history sent with the question (0: the bare prompts)")
    p.add_argument("--warmup-tokens", type=int, default=32,
                   help="an untimed round of generations of this many tokens before each timed run, at "
                        "the same N and method, so the server has measured its budgets for that load (0: none)")
    p.add_argument("--tree-budget", type=int, default=32, help="the devices' own budget cap")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0 the clients sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="a prompt samples with seed + its CRC-32")
    p.add_argument("--server", default=None, help="use a running server HOST:PORT instead of starting one")
    p.add_argument("--server-args", default="--threads 1",
                   help="extra edge-server flags (default: one torch thread; on this shared 2-core box "
                        "two threads oversubscribe and steps slow down ~20x)")
    p.add_argument("--no-pin", action="store_true",
                   help="let server and clients share every core (default: server on core 0, clients on the rest)")
    p.add_argument("--out", default=None, help="output folder (default results/<date>/load)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _settled(metrics: dict, clients: int) -> dict:
    """What the budget controller learned for this run's load (session counts rounded up to 2^k)."""
    return (metrics.get("budget") or {}).get("loads", {}).get(str(1 << (clients - 1).bit_length()), {})


def summarize(run: MethodRun, metrics: dict) -> dict:
    win = metrics.get("window", {})
    settled = _settled(metrics, run.clients)
    return {
        **run.row(),
        "batch_size_mean": win.get("batch_size", {}).get("mean", 0.0),
        "batch_size_max": win.get("batch_size", {}).get("max", 0.0),
        "batch_tokens_mean": win.get("batch_tokens", {}).get("mean", 0.0),
        "batch_tokens_p95": win.get("batch_tokens", {}).get("p95", 0.0),
        "verify_ms_p50": win.get("verify_ms", {}).get("p50", 0.0),
        "verify_ms_p95": win.get("verify_ms", {}).get("p95", 0.0),
        "queue_ms_p50": win.get("queue_ms", {}).get("p50", 0.0),
        "queue_ms_p95": win.get("queue_ms", {}).get("p95", 0.0),
        # verdict sent -> that device's next draft in (network + client drafting), lock-step only
        "device_wait_ms_p50": win.get("device_wait_ms", {}).get("p50", 0.0),
        "device_wait_ms_p95": win.get("device_wait_ms", {}).get("p95", 0.0),
        "steps": win.get("steps", 0), "budget": metrics.get("budget"),
        # the level the server settled on, and the prices (Verdict.node_prices) of its trees' first
        # and last nodes (0: every node pays)
        "budget_level": settled.get("level"),
        "first_node_price": (settled.get("node_prices") or [0.0])[0],
        "last_node_price": (settled.get("node_prices") or [0.0])[-1],
        # verdicts whose device's trees did not pay at the load's level (its link or its yield at
        # the node prices, edge_server.budget.DeviceLink), per round: those rounds decoded alone
        "declined_share": metrics["counters"].get("trees_declined", 0) / max(1, metrics["counters"]["rounds"]),
        # pipelined runs: the share of steps that verified a device draft (the rest decoded alone)
        "pipelined_tree_share": (metrics["counters"]["pipelined_steps_with_tree"]
                                 / max(1, metrics["counters"]["pipelined_steps"])),
    }


RANGE_COLUMNS = [("vs_server_ar_min", "× min", ".2f"), ("vs_server_ar_max", "× max", ".2f")]


def add_ratios(rows: list[dict]) -> None:
    """Each run's tokens/s (whole and steady) over the server-ar run at the same N and repeat."""
    base = {(r["repeat"], r["clients"]): r for r in rows if r["method"] == "server-ar"}
    for r in rows:
        b = base.get((r["repeat"], r["clients"]))
        r["vs_server_ar"] = r["tokens_per_s"] / b["tokens_per_s"] if b else float("nan")
        r["steady_vs_server_ar"] = (r["steady_tokens_per_s"] / b["steady_tokens_per_s"]
                                    if b and b["steady_tokens_per_s"] else float("nan"))


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (N, method): the median of every number over the repeats, and the range of
    the ratio to server-ar."""
    out = []
    for med, rs in median_groups(rows, ("clients", "method")):
        ratios = [r["vs_server_ar"] for r in rs]
        levels = sorted({r["budget_level"] for r in rs}, key=lambda v: (v is None, v))
        out.append({**med, "repeats": len(rs), "budget_level": "/".join(str(v) for v in levels),
                    "vs_server_ar_min": min(ratios), "vs_server_ar_max": max(ratios)})
    return out


def client_prompts(clients: int, requests: int, context_tokens: int = 0) -> list[list[str]]:
    picks = [[(i + k * clients) % len(PROMPTS) for k in range(requests)] for i in range(clients)]
    return [[with_context(PROMPTS[j], j, context_tokens) for j in row] for row in picks]


def client_lengths(clients: int, requests: int, tokens: int, spread: float) -> list[list[int]]:
    """Per-request lengths around `tokens`: real devices ask for answers of different lengths, so
    their requests end, and the next ones start, at different times; every method gets the
    same lengths, so it does the same work."""
    u = np.random.default_rng(1234).uniform(-1.0, 1.0, size=(clients, requests))
    return np.maximum(1, np.rint(tokens * (1.0 + spread * u))).astype(int).tolist()


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["clients"], r["tokens_per_s"], r["vs_server_ar"]) for r in rows if r["method"] == method)
        xs = [p[0] for p in pts]
        a1.plot(xs, [p[1] for p in pts], marker="o", label=method)
        a2.plot(xs, [p[2] for p in pts], marker="o", label=method)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent device clients (N)")
        ax.grid(alpha=0.3)
    a1.set_ylabel("total tokens/s")
    a2.set_ylabel("tokens/s ÷ server-ar")
    a2.axhline(1.0, color="k", lw=0.8)
    a1.legend()
    fig.suptitle("EdgeSpec load: continuous batching, loopback")
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=120)


def measure(address: str, n: int, method: str, args: argparse.Namespace) -> tuple[MethodRun, dict]:
    """The warm-up round (first forwards are slow; the server learns its budgets for this load),
    then the timed run and the server's metrics over it."""
    with grpc.insecure_channel(address) as channel:
        stub = rpc.EdgeSpecStub(channel)
        context, sampling = args.context_tokens, ClientSampling(args.temperature, args.top_p, args.seed)
        run_clients(address, method, client_prompts(1, 1, context), 8, args.tree_budget, ignore_eos=True,
                    sampling=sampling)
        if args.warmup_tokens:
            run_clients(address, method, client_prompts(n, 1, context), args.warmup_tokens, args.tree_budget,
                        ignore_eos=True, sampling=sampling)
        stub.GetMetrics(pb.MetricsRequest(reset=True), timeout=30)
        run = run_clients(address, method, client_prompts(n, args.requests, context),
                          client_lengths(n, args.requests, args.max_new_tokens, args.length_spread),
                          args.tree_budget, ignore_eos=True, sampling=sampling)
        metrics = json.loads(stub.GetMetrics(pb.MetricsRequest(reset=True), timeout=30).json)
    return run, summarize(run, metrics)


def usable_methods(address: str, methods: list[str]) -> tuple[list[str], dict[str, str]]:
    usable, skipped = [], {}
    with grpc.insecure_channel(address) as channel:
        stub = rpc.EdgeSpecStub(channel)
        info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
        for m in methods:
            try:
                make_drafter(parse_method(m)[0], stub, info)
                usable.append(m)
            except (SystemExit, Exception) as err:  # e.g. heads not shipped yet
                skipped[m] = str(err)
                print(f"skipping {m}: {err}", file=sys.stderr)
    return usable, skipped


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out) if args.out else results_dir("load")
    out.mkdir(parents=True, exist_ok=True)
    server_args, pinning = split_cores(args.server_args.split(), pin=not args.no_pin and not args.server)
    flags = ["--log-level", "WARNING", "--max-sessions", str(max(64, max(args.clients))),
             "--max-tree-nodes", "64", "--prompt-cache-mb", "0", *server_args]
    if args.server:
        methods, skipped = usable_methods(args.server, args.methods)
    else:
        with ServerProcess(flags) as server:
            methods, skipped = usable_methods(server.address, args.methods)
    rows, runs = [], []
    for repeat in range(args.repeats):
        for n in args.clients:
            for m in methods:
                if args.server:
                    run, row = measure(args.server, n, m, args)
                else:  # a fresh server: what the budget controller learned from another method is not carried
                    with ServerProcess(flags) as server:
                        run, row = measure(server.address, n, m, args)
                runs.append(run)
                rows.append({**row, "repeat": repeat})
                print(f"N={n:2d} {m:9s} {row['tokens_per_s']:7.1f} tok/s (steady {row['steady_tokens_per_s']:.1f})  "
                      f"τ={row['tau']:.2f}  budget {row['budget_level']}  "
                      f"ITL p50/p95 {row['itl_ms_p50']:.0f}/{row['itl_ms_p95']:.0f} ms  "
                      f"batch {row['batch_size_mean']:.1f} rows / {row['batch_tokens_mean']:.1f} tok  "
                      f"step p50 {row['verify_ms_p50']:.0f} ms  trees declined {row['declined_share']:.0%}", flush=True)
    add_ratios(rows)
    problems = lossless_problems(runs)
    shown = rows if args.repeats == 1 else median_rows(rows)
    table = markdown_table(shown, COLUMNS if args.repeats == 1 else COLUMNS + RANGE_COLUMNS)
    spread = f" x (1 ± {args.length_spread:g}) per request" if args.length_spread else ""
    prompt_tokens = np.mean([r["prompt_tokens_mean"] for r in rows])
    notes = [f"prompts of {prompt_tokens:.0f} tokens on average"
             + (f" (about {args.context_tokens} tokens of notes before each)" if args.context_tokens else ""),
             f"max_new_tokens={args.max_new_tokens}{spread} (ignore_eos), requests/client={args.requests}, "
             f"untimed warm-up of {args.warmup_tokens} tokens per client before each run, "
             f"device tree budget cap={args.tree_budget}, "
             + (f"sampling: temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed} + the "
                "prompt's CRC-32, " if args.temperature else "greedy, ")
             + (f"server {args.server} (its own flags)" if args.server
                else f"server args: {' '.join(server_args) or '(defaults)'}"),
             *([f"{args.repeats} repeats, methods interleaved; medians over repeats, each run divided by the "
                "server-ar run of its own repeat"] if args.repeats > 1 else []),
             pinning,
             f"machine: {platform.processor() or platform.machine()}, shared CPU (noisy); same run, "
             + ("one running server for every run (what its budget controller learned carries over)"
                if args.server else "a fresh server for every N and method")]
    notes += [f"skipped {m}: {why}" for m, why in skipped.items()]
    notes.append("lossless check: " + ("OK, all methods gave identical tokens" if not problems else "; ".join(problems)))
    (out / "table.md").write_text(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    save_json(out / "results.json", {"args": vars(args), "rows": rows, "table": shown, "skipped": skipped,
                                     "lossless": problems})
    if not args.no_plot:
        plot(shown, out)
    print(table)
    print("\n".join(notes))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
