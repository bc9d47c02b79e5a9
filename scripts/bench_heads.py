"""Benchmark the head drafter: accuracy, tau (offline, exact at T=0), quantization, timings.

tau is measured without the server, exactly: the eval set (build_head_data.py) holds each
eval prompt's fp32 greedy continuation and the target's hidden state at every position. A
round with committed context c (root = last token) drafts a tree from the hidden state before
the root; the target accepts the longest tree path equal to the greedy continuation (the
server's rule at temperature 0: a child is accepted when it equals the argmax at its parent),
plus the bonus token. tau = tokens gained per round.

    python scripts/bench_heads.py [--runs /tmp/edgespec-train/runs] [--budget 64]

Prints and saves results/heads/bench.json and results/heads/bench.md (a copy of the table goes
to results/summary/heads.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from device_client.drafters.heads import HeadsDrafter  # noqa: E402
from device_client.drafters.ngram import NgramDrafter  # noqa: E402

SHIPPED = ROOT / "edge_server" / "heads" / "smollm2-135m-instruct"


def write_variant(vdir: Path, onnx_path: Path, meta: dict) -> Path:
    """An artifact folder (heads.json + graph) for one graph, to load with HeadsDrafter."""
    vdir = Path(vdir)
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx_path, vdir / "heads.onnx")
    m = dict(meta)
    m["onnx"] = "heads.onnx"
    (vdir / "heads.json").write_text(json.dumps(m))
    return vdir


def load_eval(path: Path):
    d = np.load(path)
    seqs, hids, starts = [], [], d["starts"]
    off = 0
    for n in d["lens"]:
        seqs.append(d["tokens"][off:off + n])
        hids.append(d["hidden"][off:off + n])
        off += n
    return seqs, hids, starts


def simulate(drafter, eval_path: Path, budget: int, max_prompts: int | None = None, timer: list | None = None) -> dict:
    seqs, hids, starts = load_eval(eval_path)
    rounds = gained = 0
    per_prompt = []
    for seq, H, s in list(zip(seqs, hids, starts))[:max_prompts]:
        n = len(seq)
        c = int(s) + 1  # after prefill: committed prompt + the first (bonus) token
        r0, g0 = rounds, gained
        while c < n:
            ctx = seq[:c]
            hidden = H[c - 2].astype(np.float32) if drafter.needs_hidden_state else None
            t = time.perf_counter()
            tree = drafter.propose(ctx.tolist(), hidden, budget)
            if timer is not None:
                timer.append(time.perf_counter() - t)
            assert len(tree) <= budget
            target = [int(seq[c + d]) if c + d < n else -1 for d in tree.depths]
            a = len(tree.accepted_path(target)) - 1
            g = min(a + 1, n - c)
            rounds += 1
            gained += g
            c += g
        per_prompt.append((gained - g0) / max(rounds - r0, 1))
    return {"tau": gained / max(rounds, 1), "rounds": rounds, "tokens": gained,
            "tau_min_prompt": float(np.min(per_prompt)), "tau_median_prompt": float(np.median(per_prompt))}


def simulate_tau(eval_path: Path, variant_dir: Path | None, mode: str, budget: int, ngram: bool = False,
                 threads: int = 2, max_prompts: int | None = None) -> dict:
    drafter = NgramDrafter() if variant_dir is None else HeadsDrafter(variant_dir, mode, ngram, threads)
    return simulate(drafter, eval_path, budget, max_prompts)


def head_timing(hidden: int, vocab: int, heads: int, top_k: int, ranks: list[int], work: Path, threads_list=(1, 2),
                reps: int = 200) -> dict:
    """Head-only ms per call for random heads with the real shapes (fp32 and int8)."""
    import torch

    from export_heads import export_onnx, ort_session, quantize
    from heads_model import DraftHeads

    out = {}
    h = np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32)
    for r in ranks:
        name = f"r{r}" if r else "full"
        torch.manual_seed(0)
        m = DraftHeads(hidden, vocab, heads, r or None)
        for blk in m.blocks:
            torch.nn.init.normal_(blk[0].linear.weight, std=0.02)
        fp32 = export_onnx(m, top_k, work / f"timing-{name}.fp32.onnx")
        q = quantize(fp32, work / f"timing-{name}.int8.onnx", "int8-per-channel")
        for label, path in (("fp32", fp32), ("int8", q)):
            for th in threads_list:
                sess = ort_session(path, th)
                for _ in range(10):
                    sess.run(None, {"hidden": h})
                ts = []
                for _ in range(reps if r else max(20, reps // 10)):
                    t = time.perf_counter()
                    sess.run(None, {"hidden": h})
                    ts.append(time.perf_counter() - t)
                out[f"{name}/{label}/{th}t"] = round(1e3 * float(np.median(ts)), 3)
        params = sum(p.numel() for p in m.parameters())
        out[f"{name}/params"] = int(params)
        out[f"{name}/int8_bytes"] = q.stat().st_size
        del m
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="/tmp/edgespec-train/data")
    ap.add_argument("--runs", default="/tmp/edgespec-train/runs", help="run dirs r32, r64, r128, rfull from train_heads.py")
    ap.add_argument("--artifact-dir", default=str(SHIPPED))
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "results" / "heads"))
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--head-ms-json", default=None, help="reuse head-only timings saved by an earlier run")
    ap.add_argument("--timing-ranks", default="", help="ranks for head-only timing (default: shipped rank and full)")
    args = ap.parse_args(argv)

    ev = Path(args.data_dir) / "eval.npz"
    art = Path(args.artifact_dir)
    meta = json.loads((art / "heads.json").read_text())
    res: dict = {"budget": args.budget, "eval_set": str(ev), "artifact": str(art), "rank": meta["rank"],
                 "heldout_accuracy": meta.get("heldout_accuracy"), "quantization": meta.get("quantization", {}).get("scheme")}
    B, P = args.budget, args.max_prompts
    tau = {}
    tau["ngram"] = simulate(NgramDrafter(), ev, B, P)
    for mode in ("static", "dynamic"):
        tau[f"heads-{mode}"] = simulate(HeadsDrafter(art, mode, False, 2), ev, B, P)
        tau[f"heads-{mode}+ngram"] = simulate(HeadsDrafter(art, mode, True, 2), ev, B, P)
    for b in (16, 32):
        tau[f"heads-dynamic@{b}"] = simulate(HeadsDrafter(art, "dynamic", False, 2), ev, b, P)
    res["tau"] = tau
    for k, v in tau.items():
        print(f"tau {k:24s} {v['tau']:.3f}  (min prompt {v['tau_min_prompt']:.2f})")

    # ranks and precisions from the run dirs (each has artifact/ with int8 and heads.fp32.onnx)
    ranks = {}
    runs = Path(args.runs)
    for rd in sorted(runs.glob("r*")):
        a = rd / "artifact" if (rd / "artifact" / "heads.json").exists() else None
        if a is None and (rd / "heads.int8.onnx").exists() and rd.name == f"r{meta['rank']}":
            a = art
        if a is None or not (rd / "heads.fp32.onnx").exists():
            continue
        m = json.loads((a / "heads.json").read_text())
        entry = {"rank": m["rank"] or "full", "heldout_accuracy": m.get("heldout_accuracy"),
                 "int8_bytes": (a / m.get("onnx", "heads.int8.onnx")).stat().st_size}
        fpdir = write_variant(rd / "variant-bench-fp32", rd / "heads.fp32.onnx", m)
        for prec, d in (("int8", a), ("fp32", fpdir)):
            for mode in ("static", "dynamic"):
                entry[f"tau_{mode}_{prec}"] = round(simulate(HeadsDrafter(d, mode, False, 2), ev, B, P)["tau"], 4)
        ranks[rd.name] = entry
        print(rd.name, json.dumps(entry))
    res["ranks"] = ranks

    if not args.skip_timing:
        # device draft ms per round (heads forward + tree), 1 and 2 threads
        draft = {}
        for th in (1, 2):
            for mode, ng in (("static", False), ("dynamic", False), ("dynamic", True)):
                ts: list = []
                simulate(HeadsDrafter(art, mode, ng, th), ev, B, min(P or 8, 8), timer=ts)
                draft[f"{mode}{'+ngram' if ng else ''}/{th}t"] = round(1e3 * float(np.median(ts)), 3)
        res["draft_ms_per_round"] = draft
        print("draft ms/round", draft)
        work = Path("/tmp/edgespec-train/timing")
        work.mkdir(parents=True, exist_ok=True)
        if args.head_ms_json:
            res["head_ms"] = json.loads(Path(args.head_ms_json).read_text())
        else:
            ranks_t = [int(x) for x in args.timing_ranks.split(",") if x] or [meta["rank"], 0]
            res["head_ms"] = head_timing(meta["hidden_size"], meta["vocab_size"], meta["num_heads"], meta["top_k"],
                                         ranks_t, work)
            (work / "head_ms.json").write_text(json.dumps(res["head_ms"], indent=1))
        print("head ms", res["head_ms"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / "bench.md").write_text(md)
    summ = ROOT / "results" / "summary"
    summ.mkdir(parents=True, exist_ok=True)
    (summ / "heads.md").write_text(md)
    print(md)
    return 0


def to_markdown(res: dict) -> str:
    L = [f"# Head drafter benchmark (budget {res['budget']} nodes, temperature 0)", ""]
    acc = res.get("heldout_accuracy") or {}
    if acc:
        L += ["| head | +offset | top-1 | top-5 |", "|---|---|---|---|"]
        for k, (a, b) in enumerate(zip(acc["top1"], acc["top5"])):
            L.append(f"| {k} | t+{k + 2} | {a:.3f} | {b:.3f} |")
        L.append("")
    L += [f"Shipped artifact: rank {res['rank']}, quantization {res['quantization']}", "",
          "| drafter | tau | min tau per prompt | rounds |", "|---|---|---|---|"]
    for k, v in res["tau"].items():
        L.append(f"| {k} | {v['tau']:.3f} | {v['tau_min_prompt']:.2f} | {v['rounds']} |")
    if res.get("ranks"):
        L += ["", "| rank | int8 MB | top-1 (h0..h3) | tau static int8 | tau static fp32 | tau dynamic int8 | tau dynamic fp32 |",
              "|---|---|---|---|---|---|---|"]
        for name, e in res["ranks"].items():
            t1 = "/".join(f"{x:.2f}" for x in (e.get("heldout_accuracy") or {}).get("top1", []))
            L.append(f"| {e['rank']} | {e['int8_bytes']/1e6:.2f} | {t1} | {e['tau_static_int8']:.3f} | {e['tau_static_fp32']:.3f} | "
                     f"{e['tau_dynamic_int8']:.3f} | {e['tau_dynamic_fp32']:.3f} |")
    if res.get("draft_ms_per_round"):
        L += ["", "| device draft ms/round | ms |", "|---|---|"]
        L += [f"| {k} | {v:.3f} |" for k, v in res["draft_ms_per_round"].items()]
    if res.get("head_ms"):
        L += ["", "| head-only (same shapes) | value |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in res["head_ms"].items()]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
