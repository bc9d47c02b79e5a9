"""Device-edge benchmark sweep: link profiles x methods x concurrent clients.

For every emulated link (scripts/netem.py profiles) it runs the same prompts with server-only
autoregressive streaming and with device-edge speculation (none, ngram, heads), at 1 and 4
concurrent clients, and records TTFT, ITL p50/p95, tokens/s, τ, rounds per token, bytes per
token and server busy ms per token. Every run gets a fresh server (warmed by a few tokens), so
the tree budgets its controller learns belong to that link and method. With
--drop-every-s, each link also runs as one whose connections break that often (scripts/netem.py
drops; the profile is named LINK-dropSs, or LINK-silenceSs with --drop-silently): the clients
resume every broken stream, the table counts the breaks ("resumed") and the lossless check covers
the resumed answers too. Writes
results/<date>/network/{results.json, table.md, tokens_per_s_vs_rtt.png, bytes_per_token.png}.

    .venv/bin/python scripts/bench_network.py                        # the default sweep
    .venv/bin/python scripts/bench_network.py --profiles lan 4g --clients 1 --prompts 2
    .venv/bin/python scripts/bench_network.py --profiles lan 4g --drop-every-s 0 1 --max-new-tokens 256
    .venv/bin/python scripts/bench_network.py --profiles 4g --drop-every-s 0 5 --drop-silently --ignore-eos
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's packages, not the ones .venv was installed from
from bench_common import (METHODS, PROMPTS, lossless_problems, markdown_table, results_dir, run_clients,  # noqa: E402
                          save_json, split_cores)

from edge_server.launcher import ServerProcess  # noqa: E402

COLUMNS = [("profile", "link", ""), ("rtt_ms", "RTT ms", ".0f"), ("method", "method", ""),
           ("clients", "clients", "d"), ("tokens_per_s", "tok/s", ".1f"), ("vs_server_ar", "× server-ar", ".2f"),
           ("vs_none", "× none", ".2f"), ("tau", "τ", ".2f"), ("ttft_ms_p50", "TTFT ms", ".0f"),
           ("itl_ms_p50", "ITL p50", ".1f"), ("itl_ms_p95", "ITL p95", ".1f"),
           ("rounds_per_token", "rounds/tok", ".2f"), ("bytes_up_per_token", "B up/tok", ".0f"),
           ("bytes_down_per_token", "B down/tok", ".0f"), ("server_ms_per_token", "server ms/tok", ".1f"),
           ("reconnects", "resumed", "d"), ("longest_pause_ms", "longest pause ms", ".0f")]


def load_netem():
    spec = importlib.util.spec_from_file_location("netem", HERE / "netem.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["netem"] = mod
    spec.loader.exec_module(mod)
    return mod


def add_ratios(rows: list[dict]) -> None:
    base = {(r["profile"], r["clients"], r["method"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        ar = base.get((r["profile"], r["clients"], "server-ar"))
        none = base.get((r["profile"], r["clients"], "none"))
        r["vs_server_ar"] = r["tokens_per_s"] / ar if ar else float("nan")
        r["vs_none"] = r["tokens_per_s"] / none if none else float("nan")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for clients in sorted({r["clients"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, drop, silent in dict.fromkeys((r["method"], r["drop_every_s"], r["drop_silently"]) for r in rows):
            pts = sorted((r["rtt_ms"], r["tokens_per_s"]) for r in rows
                         if (r["method"], r["drop_every_s"], r["clients"]) == (method, drop, clients))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if drop else "-",
                    label=f"{method}, {'silenced' if silent else 'drops'} every {drop:g} s" if drop else method)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("link RTT (ms, emulated)")
        ax.set_ylabel("tokens/s (all clients)")
        ax.set_title(f"EdgeSpec: throughput vs RTT, {clients} client(s)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"tokens_per_s_vs_rtt_{clients}c.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    one = [r for r in rows if r["clients"] == min(x["clients"] for x in rows)]
    methods = list(dict.fromkeys(r["method"] for r in one))
    up = [sum(r["bytes_up_per_token"] for r in one if r["method"] == m) / max(1, sum(r["method"] == m for r in one)) for m in methods]
    down = [sum(r["bytes_down_per_token"] for r in one if r["method"] == m) / max(1, sum(r["method"] == m for r in one)) for m in methods]
    ax.bar(methods, up, label="up")
    ax.bar(methods, down, bottom=up, label="down")
    ax.set_ylabel("bytes per generated token")
    ax.set_title("EdgeSpec: wire bytes per token (protobuf + gRPC prefix)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes_per_token.png", dpi=120)
    plt.close(fig)


def main() -> None:
    netem = load_netem()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", nargs="+", default=["lan", "wifi", "5g", "4g", "3g", "satellite"])
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"of {', '.join(METHODS)}; a drafter may name a mode: heads/pipelined")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4])
    p.add_argument("--prompts", type=int, default=4, help="how many of the fixed prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="every answer exactly --max-new-tokens long")
    p.add_argument("--tree-budget", type=int, default=32)
    p.add_argument("--drop-every-s", nargs="+", type=float, default=[0.0],
                   help="run each link with its connections reset this often (0 = never, as the profile)")
    p.add_argument("--drop-silently", action="store_true",
                   help="the dropped connections go quiet instead of being reset (no FIN or RST reaches "
                        "either side, as when a device's network changes): only keepalive pings find them")
    p.add_argument("--server-args", default="--threads 1",
                   help="extra edge-server flags (default one torch thread: clients share this 2-core box)")
    p.add_argument("--no-pin", action="store_true",
                   help="let server and clients share every core (default: server on core 0, clients on the rest)")
    args = p.parse_args()
    prompts = PROMPTS[: args.prompts]
    out = results_dir("network")
    rows, runs = [], []
    links = [netem.with_drops(name, every, args.drop_silently) for name in args.profiles for every in args.drop_every_s]
    combos = [(link, m, c) for link in links for c in args.clients for m in args.methods]
    server_args, pinning = split_cores(args.server_args.split(), pin=not args.no_pin)
    for profile, method, clients in tqdm(combos, desc="sweep", unit="run"):
        profile_name = profile.name
        # a fresh server per run: the budgets it learns belong to this link and method only
        with ServerProcess(["--log-level", "WARNING", *server_args]) as server:
            host, port = server.address.rsplit(":", 1)
            try:
                run_clients(server.address, method, [prompts[:1]], 8, args.tree_budget)  # first forwards are slow
                with netem.run_proxy_in_thread(profile, upstream=(host, int(port)), seed=0) as (phost, pport):
                    run = run_clients(f"{phost}:{pport}", method, [prompts[i::clients] for i in range(clients)],
                                      args.max_new_tokens, args.tree_budget, ignore_eos=args.ignore_eos,
                                      reconnect_s=60 if profile.drop_every_s else 0)
            except (RuntimeError, SystemExit) as err:
                tqdm.write(f"skipping {method} on {profile_name}: {err}")
                continue
            runs.append(run)
            row = {"profile": profile_name, "rtt_ms": profile.rtt_ms, "drop_every_s": profile.drop_every_s,
                   "drop_silently": profile.drop_silently,
                   "emulator": netem.EMULATOR, **run.row()}
            rows.append(row)
            tqdm.write(f"{profile_name:>10} {method:>9} x{clients}: {row['tokens_per_s']:.1f} tok/s, "
                       f"τ={row['tau']:.2f}, ITL p50 {row['itl_ms_p50']:.1f} ms")
    problems = lossless_problems(runs)
    add_ratios(rows)
    table = markdown_table(rows, COLUMNS)
    machine = f"{platform.node()} · {platform.processor() or platform.machine()} · {platform.python_version()}"
    lossless = "OK, every method gave identical tokens" if not problems else "; ".join(problems)
    notes = f"\n- machine: {machine}; emulator: {netem.EMULATOR}; {pinning}\n- lossless check: {lossless}\n"
    save_json(out / "results.json", {"machine": machine, "args": vars(args), "rows": rows, "lossless": problems})
    (out / "table.md").write_text(table + "\n" + notes)
    plot(rows, out)
    print(table + "\n" + notes)
    print(f"wrote {out}")
    if problems:
        raise SystemExit("lossless check failed: " + lossless)


if __name__ == "__main__":
    main()
