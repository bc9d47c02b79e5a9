"""What the benchmark scripts share: prompts, concurrent device clients, result files.

Methods are compared on the same prompts in the same run. At temperature 0 every method
produces the same tokens (that is the lossless contract, checked here too), so tokens/s
compare like with like.
"""
from __future__ import annotations

import datetime as _dt
import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from device_client.cli import load_tokenizer, make_drafter
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
METHODS = ("server-ar", "none", "ngram", "heads")


@dataclass
class MethodRun:
    method: str
    clients: int
    wall_s: float
    records: list[GenerationRecord]

    def row(self) -> dict:
        recs = self.records
        tokens = sum(len(r.token_ids) for r in recs)
        rounds = sum(r.rounds for r in recs)
        itl = np.concatenate([np.asarray(r.itl_ms) for r in recs if r.itl_ms] or [np.zeros(1)])
        return {
            "method": self.method, "clients": self.clients, "requests": len(recs), "tokens": tokens,
            "wall_s": self.wall_s, "tokens_per_s": tokens / self.wall_s,
            "tau": (tokens - len(recs)) / rounds if rounds else 0.0,
            "rounds_per_token": rounds / tokens if tokens else 0.0,
            "ttft_ms_p50": statistics.median(r.ttft_ms for r in recs),
            "itl_ms_p50": float(np.percentile(itl, 50)), "itl_ms_p95": float(np.percentile(itl, 95)),
            "bytes_up_per_token": sum(r.bytes_up for r in recs) / tokens,
            "bytes_down_per_token": sum(r.bytes_down for r in recs) / tokens,
            "server_ms_per_token": sum(r.server_compute_ms for r in recs) / tokens,
            "draft_ms_per_round": sum(r.draft_ms for r in recs) / rounds if rounds else 0.0,
        }


def run_method(address: str, method: str, prompts: list[str], clients: int, max_new_tokens: int,
               tree_budget: int, timeout: float = 600.0) -> MethodRun:
    """`clients` concurrent device clients share the prompts round-robin; one channel each."""
    records: list[GenerationRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = rpc.EdgeSpecStub(channel)
                info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
                tokenizer = load_tokenizer(stub, info)
                drafter = make_drafter("none" if method == "server-ar" else method, stub, info)
                for prompt in prompts[index::clients]:
                    request = Request(tokenizer.chat_ids(prompt), max_new_tokens=max_new_tokens,
                                      tree_budget=tree_budget, server_ar=method == "server-ar")
                    rec = generate(stub, request, drafter, info.tokenizer_fingerprint, timeout=timeout)
                    with lock:
                        records.append(rec)
        except BaseException as err:  # reported after the join, with the method named
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{method} with {clients} clients failed: {errors[0]!r}") from errors[0]
    return MethodRun(method, clients, time.perf_counter() - start, records)


def check_same_outputs(runs: list[MethodRun]) -> None:
    """Lossless check across methods: the same prompt gave the same tokens everywhere."""
    seen: dict[tuple[int, ...], tuple[tuple[int, ...], str]] = {}
    for run in runs:
        for rec in run.records:
            key = tuple(rec.prompt_token_ids)
            out = tuple(rec.token_ids)
            if key in seen and seen[key][0] != out:
                raise AssertionError(f"{run.method} produced different tokens than {seen[key][1]}")
            seen.setdefault(key, (out, run.method))


def results_dir(name: str) -> Path:
    out = ROOT / "results" / _dt.date.today().isoformat() / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) if f else str(row[k]) for k, _, f in columns) + " |")
    return "\n".join(lines)


def save_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2))
