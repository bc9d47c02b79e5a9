#!/usr/bin/env python3
"""Step cost of the edge server's batched forward: what one scheduler step costs for R sessions
that each verify a K-node tree over P committed positions, on this machine's device and dtype.

This is the cost the load-aware budget trades against acceptance: on a compute-bound CPU a wider
tree costs nearly in proportion to its tokens, on a GPU a step is mostly per-row and per-layer
overhead and tree width is nearly free. The tree is the shipped heads' static tree (best paths
first, as the device drafts it) cut to K nodes; K=1 is a decoding step. Each cell is the median
of --reps steps after --warmup, timed around `TargetModel.forward_rows` (synchronized on CUDA).

--grow lets the committed length advance by one every step, as in live serving, so every step
meets key lengths it has not seen; without it every step repeats the same shapes. A gap between
the two is per-shape work (kernel selection, plan building) that a fixed-shape timing hides.
--gap-ms leaves the device idle between steps, as a server waiting for its devices' drafts
does: a GPU that lowers its clocks when idle shows it there.

--lm-head both times every cell twice, step by step alternating (this host drifts ±10% between
runs): greedy rows' argmax through the int8 screen (edge_server.greedy_head, the server's
choice on an fp32 CPU target) and through the full fp32 LM-head product. --forward both does the
same for the layers: the server's lean Llama forward (edge_server.llama_rows) and transformers'
modules.

    .venv/bin/python scripts/bench_step.py                        # CPU, one thread
    python3 scripts/bench_step.py --device cuda --grow            # on a GPU machine

Writes results/<date>/step/{results.json, table.md} (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import markdown_table, results_dir, save_json  # noqa: E402
from edge_server.hardware import DTYPES, keep_freed_memory, pick_device, pick_dtype  # noqa: E402
from edge_server.kv_cache import KVPool, Row  # noqa: E402
from edge_server.model_store import load_model  # noqa: E402
from edge_server.verifier import TargetModel  # noqa: E402
from shared.tree import TokenTree, merge_paths  # noqa: E402

HEADS_META = Path(__file__).resolve().parent.parent / "edge_server" / "heads" / "smollm2-135m-instruct" / "heads.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: the server's choice")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the load benchmark's server uses 1)")
    p.add_argument("--past", type=int, nargs="+", default=[150, 600], help="committed positions per session")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8], help="sessions in the step")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 8, 16], help="tree nodes per session")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grow", action="store_true", help="advance the committed length by one every step")
    p.add_argument("--gap-ms", type=float, default=0.0, help="idle time between steps (untimed)")
    p.add_argument("--lm-head", choices=["server", "full", "both"], default="server",
                   help="greedy rows' argmax: the server's way (the int8 screen where it applies), the full "
                        "fp32 product, or both alternating")
    p.add_argument("--forward", choices=["server", "modules", "both"], default="server",
                   help="the layers: the server's way (edge_server.llama_rows for Llama-family models), "
                        "transformers' own modules with the ragged cache hooked in, or both alternating")
    p.add_argument("--out", default=None, help="output folder (default results/<date>/step)")
    return p.parse_args(argv)


def heads_tree(nodes: int) -> TokenTree:
    """The shipped static tree's first `nodes` nodes; token ids are placeholders (rank r at
    depth d), since a step's cost does not depend on which tokens it verifies."""
    paths = json.loads(HEADS_META.read_text())["static_tree"]["paths"]
    tokens = [[1000 * (d + 1) + r for d, r in enumerate(p)] for p in paths]
    tree = merge_paths(1, tokens, nodes)
    if len(tree) < nodes:
        raise SystemExit(f"the static tree has {len(tree)} nodes; ask for at most that many")
    return tree


class Bench:
    def __init__(self, target: TargetModel, pool: KVPool, device: str):
        self.target, self.pool, self.sync = target, pool, device.startswith("cuda")
        self.rng = np.random.default_rng(0)

    def sessions(self, rows: int, past: int, room: int) -> list:
        """Slots holding `past` committed positions of random tokens (prefilled in chunks)."""
        slots = []
        for _ in range(rows):
            slot = self.pool.allocate(past + room)
            for start in range(0, past, 128):
                ids = self.rng.integers(100, 20000, min(128, past - start)).tolist()
                self.target.forward_rows([Row(slot, start, ids, list(range(start, start + len(ids))))])
            slot.length = past
            slots.append(slot)
        return slots

    def step_ms(self, slots: list, past: int, tree: TokenTree, args: argparse.Namespace,
                variants: dict) -> dict[tuple[str, str], float]:
        """Median step ms per variant: (LM head, forward) -> the target's (screened_head,
        llama_rows)."""
        times: dict[tuple[str, str], list[float]] = {name: [] for name in variants}
        for i in range(args.warmup + args.reps):
            at = past + (i if args.grow else 0)
            for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
                time.sleep(args.gap_ms / 1e3)
                self.target.screened_head, self.target.llama_rows = variants[name]
                rows = [Row.for_tree(s, at, tree, greedy=True) for s in slots]
                self._sync()
                start = time.perf_counter()
                self.target.forward_rows(rows)
                self._sync()
                times[name].append(time.perf_counter() - start)
        return {name: float(np.median(t[args.warmup:]) * 1e3) for name, t in times.items()}

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if device == "cpu":
        keep_freed_memory()  # as the server does
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model("default", dtype, device).model
    target = TargetModel(model, max(args.past) + args.warmup + args.reps + max(args.nodes) + 64)
    room = args.warmup + args.reps + max(args.nodes) + 1
    pool = KVPool.for_model(model, 1e9)  # no budget: the slots are few and freed after each cell
    bench = Bench(target, pool, device)
    trees = {k: heads_tree(k) for k in args.nodes}
    heads = {"full": None, "screened": target.screened_head} if args.lm_head == "both" else \
        {args.lm_head: None if args.lm_head == "full" else target.screened_head}
    forwards = {"modules": None, "server": target.llama_rows} if args.forward == "both" else \
        {args.forward: None if args.forward == "modules" else target.llama_rows}
    variants = {(h, f): (head, fwd) for h, head in heads.items() for f, fwd in forwards.items()}
    rows = []
    for past in args.past:
        for n in args.rows:
            slots = bench.sessions(n, past, room)
            cells = {k: bench.step_ms(slots, past, trees[k], args, variants) for k in args.nodes}
            for slot in slots:
                pool.free(slot)
            for head, forward in variants:
                name = (head, forward)
                base = cells[min(args.nodes)][name]
                for k, ms in cells.items():
                    ratio = lambda other: ms[name] / ms[other] if other in ms else None  # noqa: E731
                    rows.append({"past": past, "rows": n, "nodes": k, "tokens": n * k, "lm_head": head,
                                 "forward": forward, "step_ms": ms[name], "vs_fewest_nodes": ms[name] / base,
                                 "vs_full": ratio(("full", forward)), "vs_modules": ratio((head, "modules"))})
                print(f"past {past:4d} rows {n:2d} {head:8s} {forward:7s}: "
                      + "  ".join(f"k={k}: {ms[name]:6.1f} ms" for k, ms in cells.items()), flush=True)
    columns = [("past", "committed", ""), ("rows", "sessions", ""), ("nodes", "nodes/tree", ""),
               ("tokens", "step tokens", ""), ("lm_head", "greedy argmax", ""), ("forward", "layers", ""),
               ("step_ms", "step ms", ".1f"), ("vs_fewest_nodes", f"× k={min(args.nodes)}", ".2f")]
    if args.lm_head == "both":
        columns.append(("vs_full", "× full product", ".2f"))
    if args.forward == "both":
        columns.append(("vs_modules", "× modules", ".2f"))
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    note = (f"{where}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, {args.threads} CPU thread(s), "
            f"median of {args.reps} steps after {args.warmup} warm-up, "
            + ("committed length +1 every step (--grow)" if args.grow else "the same shapes every step")
            + (f", {args.gap_ms:g} ms idle before every step" if args.gap_ms else ""))
    out = Path(args.out) if args.out else results_dir("step")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(rows, columns) + f"\n\n- {note}\n")
    save_json(out / "results.json", {"args": vars(args), "device": where, "dtype": str(dtype), "rows": rows})
    print(note)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
