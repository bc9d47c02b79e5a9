"""Prompt cache benchmark: questions on one long document, with the server's prompt cache on and off.

Each of --clients device clients asks --questions questions one after another, each after the
same ~--context-tokens tokens of notes (one document, as devices asking about a shared manual
send it, or as a chat resends its history), each answer exactly --max-new-tokens tokens. The
same run goes to a fresh server with the prompt cache on (--prompt-cache-mb) and to one with it
off, in turn (the order flips every repeat). The table gives, per setting, the time to first
token of the clients' first questions and of their later ones, the later requests' whole time,
the share of the later prompts' tokens the server took from its cache, the tokens/s of the whole
run, and those times (off / on) and tokens/s (on / off) as ratios within each repeat. Greedy
outputs must be identical with and without the cache (checked).

Then a chat (--chat-turns, 0 for none): `device-client --chat` sends a first message with the
notes in it and short follow-ups, each turn the whole conversation, to a server with and one
without the cache; a second table gives each turn's prompt, what was cached, and its TTFT and
whole time both ways (the same answers both ways, checked).

Writes results/<date>/prompt_cache/{results.json, table.md}.

    .venv/bin/python scripts/bench_prompt_cache.py
    .venv/bin/python scripts/bench_prompt_cache.py --clients 1 4 --questions 4 --context-tokens 1500 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_common import (PROMPTS, MethodRun, lossless_problems, markdown_table, median_groups,  # noqa: E402
                          results_dir, run_clients, save_json, split_cores, with_context)

from edge_server.launcher import ServerProcess  # noqa: E402

COLUMNS = [("clients", "N", "d"), ("cache", "prompt cache", ""), ("prompt_tokens_mean", "prompt tokens", ".0f"),
           ("cached_share_later", "later prompts cached", ".0%"), ("ttft_ms_first", "TTFT first ms p50", ".0f"),
           ("ttft_ms_later", "TTFT later ms p50", ".0f"), ("request_s_later", "request later s p50", ".2f"),
           ("tokens_per_s", "tok/s", ".1f"), ("ttft_first_off_over_on", "TTFT first off/on", ".1f"),
           ("ttft_off_over_on", "TTFT later off/on", ".1f"), ("request_off_over_on", "request later off/on", ".1f"),
           ("tokens_per_s_on_over_off", "tok/s on/off", ".1f")]


CHAT_COLUMNS = [("turn", "turn", "d"), ("prompt_tokens", "prompt tokens", "d"), ("cached", "cached", "d"),
                ("ttft_ms_on", "TTFT on ms", ".0f"), ("ttft_ms_off", "TTFT off ms", ".0f"),
                ("ttft_off_over_on", "TTFT off/on", ".1f"), ("request_s_on", "turn on s", ".2f"),
                ("request_s_off", "turn off s", ".2f"), ("request_off_over_on", "turn off/on", ".1f")]
FOLLOW_UPS = ["Give one example of it.", "What do the notes say about the with statement?",
              "Thanks. One more example, please.", "Which of the two would you teach first?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    p.add_argument("--questions", type=int, default=4, help="questions each client asks in turn")
    p.add_argument("--context-tokens", type=int, default=1500, help="tokens of notes before every question")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat-turns", type=int, default=4, help="turns of the chat (0: no chat)")
    p.add_argument("--method", default="server-ar", help="server-ar, or a drafter as in bench_load.py")
    p.add_argument("--cache-mb", type=float, default=512.0, help="--prompt-cache-mb of the server with the cache")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--server-args", default="--threads 1", help="extra edge-server flags")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server and the clients to separate cores")
    p.add_argument("--out", default=None, help="output folder (default results/<date>/prompt_cache)")
    return p.parse_args(argv)


def questions(clients: int, count: int, context_tokens: int) -> list[list[str]]:
    """Client i asks PROMPTS i, i+1, ... in turn, each after the same notes."""
    return [[with_context(PROMPTS[(i + k) % len(PROMPTS)], 0, context_tokens) for k in range(count)]
            for i in range(clients)]


def summarize(run: MethodRun, cache: bool) -> dict:
    firsts = [recs[0] for recs in run.per_client]
    later = [r for recs in run.per_client for r in recs[1:]]
    p50 = lambda values: float(np.percentile(values, 50)) if values else None  # noqa: E731
    return dict(clients=run.clients, cache="on" if cache else "off",
                prompt_tokens_mean=float(np.mean([len(r.prompt_token_ids) for r in run.records])),
                cached_share_later=(sum(r.cached_prompt_tokens for r in later)
                                    / max(1, sum(len(r.prompt_token_ids) for r in later))),
                ttft_ms_first=p50([r.ttft_ms for r in firsts]), ttft_ms_later=p50([r.ttft_ms for r in later]),
                request_s_later=p50([r.total_ms / 1e3 for r in later]),
                tokens_per_s=sum(len(r.token_ids) for r in run.records) / run.wall_s)


def add_ratios(rows: list[dict]) -> None:
    """Each run with the cache gets off / on of the same repeat and N."""
    for row in rows:
        if row["cache"] != "on":
            continue
        off = next(r for r in rows if r["cache"] == "off" and r["clients"] == row["clients"]
                   and r["repeat"] == row["repeat"])
        row["ttft_first_off_over_on"] = off["ttft_ms_first"] / row["ttft_ms_first"]
        row["ttft_off_over_on"] = off["ttft_ms_later"] / row["ttft_ms_later"]
        row["request_off_over_on"] = off["request_s_later"] / row["request_s_later"]
        row["tokens_per_s_on_over_off"] = row["tokens_per_s"] / off["tokens_per_s"]


def median_rows(rows: list[dict]) -> list[dict]:
    return [med for med, _ in median_groups(rows, ("clients", "cache"))]


def chat(address: str, turns: int, context_tokens: int, max_new_tokens: int) -> list[dict]:
    """One `device-client --chat` conversation: a question after the notes, then follow-ups;
    each turn's --json record."""
    messages = [with_context("Summarize what the notes say about the import statement.", 3, context_tokens)
                .replace("\n", " "), *FOLLOW_UPS][:turns]
    out = subprocess.run([sys.executable, "-m", "device_client.cli", "--server", address, "--chat", "--json",
                          "--mode", "server-ar", "--max-new-tokens", str(max_new_tokens)],
                         input="\n".join(messages) + "\n", cwd=HERE.parent, capture_output=True, text=True,
                         timeout=1800, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"text"')]


def chat_rows(chats: list[tuple[int, bool, list[dict]]]) -> tuple[list[dict], list[str]]:
    """Per turn, medians over repeats of the chats with and without the cache; and any turn
    whose answer differed."""
    rows, problems = [], []
    for turn in range(min(len(records) for _, _, records in chats)):
        by = {cache: [records[turn] for _, c, records in chats if c == cache] for cache in (True, False)}
        if any(r["token_ids"] != by[True][0]["token_ids"] for r in by[True] + by[False]):
            problems.append(f"chat turn {turn + 1}: different answers with and without the cache")
        med = lambda cache, key, scale=1.0: statistics.median(r[key] * scale for r in by[cache])  # noqa: E731
        row = dict(turn=turn + 1, prompt_tokens=len(by[True][0]["prompt_token_ids"]),
                   cached=int(med(True, "cached_prompt_tokens")), ttft_ms_on=med(True, "ttft_ms"),
                   ttft_ms_off=med(False, "ttft_ms"), request_s_on=med(True, "total_ms", 1e-3),
                   request_s_off=med(False, "total_ms", 1e-3))
        row.update(ttft_off_over_on=row["ttft_ms_off"] / row["ttft_ms_on"],
                   request_off_over_on=row["request_s_off"] / row["request_s_on"])
        rows.append(row)
    return rows, problems


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out) if args.out else results_dir("prompt_cache")
    out.mkdir(parents=True, exist_ok=True)
    server_args, pinning = split_cores(args.server_args.split(), pin=not args.no_pin)
    rows, runs, chats = [], [], []
    for repeat in range(args.repeats):
        for n in args.clients:
            for cache in ((True, False) if repeat % 2 == 0 else (False, True)):
                flags = ["--log-level", "WARNING", "--max-sessions", str(max(64, n)),
                         "--prompt-cache-mb", str(args.cache_mb if cache else 0), *server_args]
                with ServerProcess(flags) as server:
                    run_clients(server.address, args.method, [[PROMPTS[0]]], 8, 32, ignore_eos=True)  # first forwards
                    run = run_clients(server.address, args.method, questions(n, args.questions, args.context_tokens),
                                      args.max_new_tokens, 32, ignore_eos=True)
                runs.append(run)
                rows.append({**summarize(run, cache), "repeat": repeat})
                r = rows[-1]
                print(f"N={n} cache {r['cache']:3s}: TTFT first {r['ttft_ms_first']:.0f} ms, later "
                      f"{r['ttft_ms_later']:.0f} ms ({r['cached_share_later']:.0%} of their prompts cached), "
                      f"request later {r['request_s_later']:.2f} s, {r['tokens_per_s']:.1f} tok/s", flush=True)
        for cache in ((True, False) if repeat % 2 == 0 else (False, True)) if args.chat_turns else ():
            flags = ["--log-level", "WARNING", "--prompt-cache-mb", str(args.cache_mb if cache else 0), *server_args]
            with ServerProcess(flags) as server:
                chats.append((repeat, cache, chat(server.address, args.chat_turns, args.context_tokens,
                                                  args.max_new_tokens)))
            print(f"chat, cache {'on' if cache else 'off'}: TTFT per turn "
                  + " / ".join(f"{t['ttft_ms']:.0f}" for t in chats[-1][2]) + " ms", flush=True)
    add_ratios(rows)
    turns, chat_problems = chat_rows(chats) if chats else ([], [])
    problems = lossless_problems(runs) + chat_problems
    shown = rows if args.repeats == 1 else median_rows(rows)
    notes = [f"{args.questions} questions a client, each after the same ~{args.context_tokens} tokens of notes "
             f"(prompts of {np.mean([r['prompt_tokens_mean'] for r in rows]):.0f} tokens on average), "
             f"{args.max_new_tokens} tokens an answer (ignore_eos), method {args.method}",
             f"cache on: --prompt-cache-mb {args.cache_mb:g}; a fresh server for every setting and N; "
             f"server args: {' '.join(server_args) or '(defaults)'}",
             *([f"{args.repeats} repeats, the order of on and off flipped each repeat; medians"]
               if args.repeats > 1 else []),
             pinning, f"machine: {platform.processor() or platform.machine()}, shared CPU (noisy)",
             "lossless check: " + ("OK, identical tokens with and without the cache" if not problems
                                   else "; ".join(problems))]
    table = markdown_table(shown, COLUMNS)
    if turns:
        notes.insert(1, f"chat: `device-client --chat --mode server-ar`, {args.chat_turns} turns of "
                        f"{args.max_new_tokens} tokens at most, the first message with the notes in it")
        table += "\n\n" + markdown_table(turns, CHAT_COLUMNS)
    (out / "table.md").write_text(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    save_json(out / "results.json", {"args": vars(args), "rows": rows, "table": shown, "chats": chats,
                                     "chat_table": turns, "lossless": problems})
    print(table)
    print("\n".join(notes))
    print(f"wrote {out}")
    if problems:
        raise SystemExit("outputs differ with and without the prompt cache")


if __name__ == "__main__":
    main()
