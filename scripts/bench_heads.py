"""Benchmark the head drafter: accuracy, tau (offline, exact at T=0), quantization, timings.

tau is measured without the server, exactly: the eval set (build_head_data.py) holds each
eval prompt's fp32 greedy continuation and the target's hidden state at every position. A
round with committed context seq[:c] has the root seq[c-1] (the bonus token the server
returned; the drafter takes it as context[-1], and root-conditioned heads are fed it) and
drafts a tree from the hidden state at c-2, the position before the root, whose LM-head argmax
is the root; the target accepts the longest tree path equal to the greedy continuation (the
server's rule at temperature 0: a child is accepted when it equals the argmax at its parent),
plus the bonus token. tau = tokens gained per round.

    python scripts/bench_heads.py [--runs /tmp/edgespec-train/runs] [--budgets 8,16,32,64] [--heldout]

Prints and saves results/heads/bench.json and results/heads/bench.md (a copy of the table goes
to results/summary/heads.md, keeping any hand-written "## " sections already at its end).

heads-unified* (tree_builders.unified_tree) score candidates with the calibration in heads.json
`tree_calibration`, fitted by scripts/calibrate_tree.py on the held-out split, not on the eval
set reported here; `--heldout` adds the same table on that held-out split (in-sample for them).
"""
from __future__ import annotations

import argparse
import json
import re
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

Sequences = tuple[list[np.ndarray], list[np.ndarray], np.ndarray]  # token seqs, hidden states, starts

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


_LOADED: dict[str, Sequences] = {}


def load_eval(path: Path) -> Sequences:
    """Per prompt: token sequence, hidden states, prompt length (read once per path: NpzFile
    re-reads an array on every access)."""
    if str(path) not in _LOADED:
        d = np.load(path)
        tokens, hidden, offs = d["tokens"], d["hidden"], np.concatenate([[0], np.cumsum(d["lens"])])
        _LOADED[str(path)] = ([tokens[a:b] for a, b in zip(offs, offs[1:])],
                              [hidden[a:b] for a, b in zip(offs, offs[1:])], d["starts"])
    return _LOADED[str(path)]


def first_tokens(data: Sequences, n: int) -> Sequences:
    """Each eval response cut to its first `n` tokens: tau grows along a response (the target
    repeats itself and prompt lookup catches it), so short generations see less of it."""
    seqs, hids, starts = data
    return [s[:st + n] for s, st in zip(seqs, starts)], [h[:st + n] for h, st in zip(hids, starts)], starts


def by_source(data: Sequences, sources: np.ndarray) -> dict[str, Sequences]:
    """The eval set per prompt source: one average hides that some sources are much harder."""
    seqs, hids, starts = data
    return {str(name): ([seqs[i] for i in idx], [hids[i] for i in idx], starts[idx])
            for name in np.unique(sources) for idx in [np.flatnonzero(sources == name)]}


def simulate(drafter, eval_path: Path | Sequences, budget: int, max_prompts: int | None = None,
             timer: list | None = None) -> dict:
    """Offline greedy rounds over the eval set, or over sequences already loaded (see the module
    docstring); `timer` collects the seconds each propose() took."""
    seqs, hids, starts = eval_path if isinstance(eval_path, tuple) else load_eval(eval_path)
    rounds = gained = 0
    per_prompt = []
    for seq, H, s in list(zip(seqs, hids, starts))[:max_prompts]:
        n = len(seq)
        c = int(s) + 1  # after prefill: committed prompt + the first (bonus) token
        r0, g0 = rounds, gained
        while c < n:
            ctx = seq[:c]  # root = ctx[-1] = seq[c - 1], the token after the hidden state's position
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


def simulate_tau(eval_path: Path | Sequences, variant_dir: Path | None, mode: str | None, budget: int,
                 ngram: bool = False, threads: int = 1, max_prompts: int | None = None) -> dict:
    """simulate() with the heads drafter on the artifact folder `variant_dir` (None: ngram alone)."""
    drafter = NgramDrafter() if variant_dir is None else HeadsDrafter(variant_dir, mode, ngram, threads)
    return simulate(drafter, eval_path, budget, max_prompts)


def head_timing(hidden: int, vocab: int, heads: int, top_k: int, variants: list[tuple[str, bool]], work: Path,
                threads_list=(1, 2), reps: int = 200) -> dict:
    """Head-only ms per call for random heads with the real shapes (fp32 and int8), for each
    (variant name as parse_variant reads it, root_conditioned)."""
    import torch

    from export_heads import export_onnx, ort_session, quantize
    from heads_model import DraftHeads

    out = {}
    feeds_all = {"hidden": np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32),
                 "root": np.array([vocab // 3], dtype=np.int64), "heads": np.array([heads], dtype=np.int64)}
    for variant, cond in variants:
        r, dense, shared = parse_variant(variant)
        name = variant + ("-root" if cond else "-plain")
        torch.manual_seed(0)
        m = DraftHeads(hidden, vocab, heads, r or None, root_conditioned=cond, dense_tokens=dense, dense_shared=shared)
        for blk in m.blocks:
            torch.nn.init.normal_(blk[0].linear.weight, std=0.02)
        if dense:  # random distinct ids (the scatter's cost does not depend on which), random rows
            m.dense_ids.copy_(torch.randperm(vocab)[:dense])
            torch.nn.init.normal_(m.D, std=0.02)
        fp32 = export_onnx(m, top_k, work / f"timing-{name}.fp32.onnx")
        q = quantize(fp32, work / f"timing-{name}.int8.onnx", "int8-per-channel")
        for label, path in (("fp32", fp32), ("int8", q)):
            for th in threads_list:
                sess = ort_session(path, th)
                feeds = {i.name: feeds_all[i.name] for i in sess.get_inputs()}
                for _ in range(10):
                    sess.run(None, feeds)
                ts = []
                for _ in range(reps if r else max(20, reps // 10)):
                    t = time.perf_counter()
                    sess.run(None, feeds)
                    ts.append(time.perf_counter() - t)
                out[f"{name}/{label}/{th}t"] = round(1e3 * float(np.median(ts)), 3)
        params = sum(p.numel() for p in m.parameters())
        out[f"{name}/params"] = int(params)
        out[f"{name}/int8_bytes"] = q.stat().st_size
        del m
    return out


def variant_name(meta: dict) -> str:
    """r64, r64d1024 (rank 64 + dense rows per head for 1,024 frequent tokens), r64s4096 (one
    set of dense rows shared by the heads), full."""
    dense = meta.get("dense_tokens", 0)
    return ((f"r{meta['rank']}" if meta["rank"] else "full")
            + (f"{'s' if meta.get('dense_shared') else 'd'}{dense}" if dense else ""))


def parse_variant(name: str) -> tuple[int, int, bool]:
    """variant_name's inverse: (rank, dense_tokens, dense_shared); rank 0 = full."""
    m = re.fullmatch(r"(?:r(\d+)|full)(?:([ds])(\d+))?", name)
    if not m:
        raise ValueError(f"head variant {name!r}: expected r<rank>, r<rank>d<tokens>, r<rank>s<tokens> or full")
    return int(m[1] or 0), int(m[3] or 0), m[2] == "s"


DRAFTERS = {  # name -> (heads mode or None for the ngram drafter alone, merge ngram branches)
    "ngram": (None, False),
    "heads-static": ("static", False),
    "heads-static+ngram": ("static", True),
    "heads-dynamic": ("dynamic", False),
    "heads-dynamic+ngram": ("dynamic", True),  # ngram paths first, a fixed share of the budget
    "heads-unified": ("unified", False),  # calibrated best-first (tree_calibration in heads.json)
    "heads-unified+ngram": ("unified", True),
}
RUN_DRAFTERS = ("heads-static", "heads-dynamic", "heads-dynamic+ngram", "heads-unified+ngram")  # per run


def shipped_by(run_dir: Path, art: Path, meta: dict) -> bool:
    """Whether `run_dir` (train_heads.py --run-dir) produced the artifact in `art`."""
    mine, shipped = run_dir / "heads.int8.onnx", art / meta.get("onnx", "heads.int8.onnx")
    return mine.exists() and shipped.exists() and mine.read_bytes() == shipped.read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="/tmp/edgespec-train/data")
    ap.add_argument("--runs", default="/tmp/edgespec-train/runs",
                    help="run dirs from train_heads.py (with --no-artifact: RUN/artifact; else the shipped one)")
    ap.add_argument("--artifact-dir", default=str(SHIPPED))
    ap.add_argument("--budgets", default="8,16,32,64",
                    help="tree budgets (nodes, root included) for the drafter table; the largest is used for "
                         "the per-run table and the timings")
    ap.add_argument("--out", default=str(ROOT / "results" / "heads"))
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--head-ms-json", default=None, help="reuse head-only timings saved by an earlier run")
    ap.add_argument("--timing-variants", default="",
                    help="head-only timing variants, e.g. r64,r64d1024,r64s4096,full (d / s: dense rows per head / "
                         "shared; default: the shipped heads and full rank)")
    ap.add_argument("--heldout", action="store_true",
                    help="also the drafter table on the held-out split (the unified tree's calibration data)")
    args = ap.parse_args(argv)

    ev = Path(args.data_dir) / "eval.npz"
    art = Path(args.artifact_dir)
    meta = json.loads((art / "heads.json").read_text())
    budgets = sorted(int(b) for b in args.budgets.split(","))
    B, P = budgets[-1], args.max_prompts
    res: dict = {"budget": B, "budgets": budgets, "eval_set": str(ev), "artifact": str(art), "rank": meta["rank"],
                 "variant": variant_name(meta),
                 "root_conditioned": meta.get("root_conditioned", False),
                 "heldout_accuracy": meta.get("heldout_accuracy"), "quantization": meta.get("quantization", {}).get("scheme")}
    drafters = {n: v for n, v in DRAFTERS.items() if v[0] != "unified" or "tree_calibration" in meta}
    res["tau"] = drafter_table(ev, art, drafters, budgets, P)
    res["tau_first64"] = drafter_table(first_tokens(load_eval(ev), 64), art, drafters, budgets, P)
    best = "heads-unified+ngram" if "heads-unified+ngram" in drafters else "heads-dynamic+ngram"
    res["tau_by_source_drafter"], res["tau_by_source"] = best, {}
    for name, part in by_source(load_eval(ev), np.load(ev)["sources"]).items():
        tau = drafter_table(part, art, {best: drafters[best]}, budgets, P)[best]
        res["tau_by_source"][name] = {"prompts": len(part[0]), "tau": tau}
    if args.heldout:
        res["tau_heldout"] = drafter_table(heldout_data(Path(args.data_dir)), art, drafters, budgets, P)

    # runs (rank, root conditioning) and precisions: int8 artifact vs the run's heads.fp32.onnx
    runs = {}
    for rd in sorted(p for p in Path(args.runs).iterdir() if p.is_dir()):
        a = rd / "artifact" if (rd / "artifact" / "heads.json").exists() else art if shipped_by(rd, art, meta) else None
        if a is None or not (rd / "heads.fp32.onnx").exists():
            continue
        m = json.loads((a / "heads.json").read_text())
        entry = {"rank": m["rank"] or "full", "variant": variant_name(m),
                 "root_conditioned": m.get("root_conditioned", False),
                 "shipped": shipped_by(rd, art, meta), "heldout_accuracy": m.get("heldout_accuracy"),
                 "scheme": m.get("quantization", {}).get("scheme"),
                 "int8_bytes": (a / m.get("onnx", "heads.int8.onnx")).stat().st_size,
                 "train_seconds": m.get("training", {}).get("train_seconds")}
        fpdir = write_variant(rd / "variant-bench-fp32", rd / "heads.fp32.onnx", m)
        for prec, d in (("int8", a), ("fp32", fpdir)):
            for name in RUN_DRAFTERS if "tree_calibration" in m else RUN_DRAFTERS[:-1]:
                mode, ng = DRAFTERS[name]
                entry[f"tau_{name}_{prec}"] = round(simulate_tau(ev, d, mode, B, ng, max_prompts=P)["tau"], 4)
        runs[rd.name] = entry
        print(rd.name, json.dumps(entry))
    res["runs"] = runs

    if not args.skip_timing:
        # device draft ms per round (heads forward + tree), 1 and 2 threads
        draft = {}
        for th in (1, 2):
            for mode, ng in (("static", False), ("dynamic", False), ("dynamic", True), ("unified", True)):
                if mode == "unified" and "tree_calibration" not in meta:
                    continue
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
            shipped = variant_name(meta)
            names = [x for x in args.timing_variants.split(",") if x] or [shipped, "full"]
            # the shipped heads with and without root conditioning: what conditioning costs the device
            variants = [(v, c) for v in names for c in ((False, True) if v == shipped else (True,))]
            res["head_ms"] = head_timing(meta["hidden_size"], meta["vocab_size"], meta["num_heads"], meta["top_k"],
                                         variants, work)
            (work / "head_ms.json").write_text(json.dumps(res["head_ms"], indent=1))
        print("head ms", res["head_ms"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / "bench.md").write_text(md)
    summ = ROOT / "results" / "summary"
    summ.mkdir(parents=True, exist_ok=True)
    notes = (summ / "heads.md").read_text() if (summ / "heads.md").exists() else ""
    notes = notes[notes.index("\n## ") + 1:] if "\n## " in notes else ""  # hand-written sections stay
    (summ / "heads.md").write_text(md + ("\n" + notes if notes else ""))
    print(md)
    return 0


def drafter_table(data: Path | Sequences, art: Path, drafters: dict, budgets: list[int], P: int | None) -> dict:
    """tau of each drafter at each budget on one data set."""
    tau: dict = {}
    for name, (mode, ng) in drafters.items():
        tau[name] = {}
        for b in budgets:
            tau[name][str(b)] = v = simulate_tau(data, art if mode else None, mode, b, ng, max_prompts=P)
            print(f"tau {name:22s} @{b:<3d} {v['tau']:.3f}  (min prompt {v['tau_min_prompt']:.2f})")
    return tau


def heldout_data(data_dir: Path) -> Sequences:
    """The held-out split as whole sequences (calibrate_tree.py rebuilds the prompts)."""
    from transformers import AutoTokenizer

    from calibrate_tree import heldout_sequences
    from edge_server.model_store import resolve_model_path

    return heldout_sequences(data_dir, AutoTokenizer.from_pretrained(resolve_model_path("default")))


def tau_table(tau: dict, budgets: list[int]) -> list[str]:
    """Markdown rows: tau per drafter and budget, the worst prompt and rounds at the largest."""
    B = budgets[-1]
    L = ["| drafter | " + " | ".join(f"@{b}" for b in budgets) + f" | min tau per prompt @{B} | rounds @{B} |",
         "|---|" + "---|" * (len(budgets) + 2)]
    for name, per in tau.items():
        L.append(f"| {name} | " + " | ".join(f"{per[str(b)]['tau']:.3f}" for b in budgets)
                 + f" | {per[str(B)]['tau_min_prompt']:.2f} | {per[str(B)]['rounds']} |")
    return L


def to_markdown(res: dict) -> str:
    """The benchmark as markdown tables (results/summary/heads.md)."""
    B = res["budget"]
    L = ["# Head drafter benchmark (temperature 0, exact offline tau on the eval set)", ""]
    acc = res.get("heldout_accuracy") or {}
    if acc:
        L += ["Shipped heads, held-out accuracy (the torch heads before export):", "",
              "| head | +offset | top-1 | top-5 |", "|---|---|---|---|"]
        for k, (a, b) in enumerate(zip(acc["top1"], acc["top5"])):
            L.append(f"| {k} | t+{k + 2} | {a:.3f} | {b:.3f} |")
        L.append("")
    cond = "root-conditioned" if res.get("root_conditioned") else "plain"
    budgets = res["budgets"]
    L += [f"Shipped artifact: {res['variant']} (rank {res['rank']}), {cond}, quantization {res['quantization']}. "
          "tau (tokens per round, bonus included) by tree budget (nodes, root included):", ""]
    L += tau_table(res["tau"], budgets)
    if any(n.startswith("heads-unified") for n in res["tau"]):
        L += ["", "heads-dynamic+ngram: ngram paths (max 4-gram, min 2, depth 8) take a fixed quarter of the "
              "budget, heads by cumulative log-prob fill the rest. heads-unified(+ngram): one best-first tree "
              "by calibrated P(accept) over head candidates and lookups below every node (heads.json "
              "`tree_calibration`, fitted on the held-out split by scripts/calibrate_tree.py, not on this set)."]
    if res.get("tau_first64"):
        L += ["", "The same drafters over each eval response's first 64 tokens only (what the load and network "
              "benchmarks generate per request; tau grows along a response as the target repeats itself):", ""]
        L += tau_table(res["tau_first64"], budgets)
    if res.get("tau_by_source"):
        L += ["", f"{res['tau_by_source_drafter']} by eval prompt source (whole responses; the first column "
              "names the source):", ""]
        L += tau_table({f"{n} ({e['prompts']} prompts)": e["tau"] for n, e in res["tau_by_source"].items()}, budgets)
    if res.get("tau_heldout"):
        L += ["", "The same drafters on the held-out split (96 prompts; the calibration data of "
              "heads-unified*, so in-sample for them):", ""]
        L += tau_table(res["tau_heldout"], budgets)
    if res.get("runs"):
        L += ["", f"Runs (same data), int8 artifact vs the run's fp32 graph, budget {B}:", "",
              "| run | rank | root | scheme | int8 MB | top-1 (h0..h3) | top-5 (h0..h3) | static int8 / fp32 "
              "| dynamic int8 / fp32 | dynamic+ngram int8 / fp32 | unified+ngram int8 / fp32 | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, e in res["runs"].items():
            a = e.get("heldout_accuracy") or {}
            t1 = "/".join(f"{x:.2f}" for x in a.get("top1", []))
            t5 = "/".join(f"{x:.2f}" for x in a.get("top5", []))
            taus = " | ".join(f"{e[f'tau_{m}_int8']:.3f} / {e[f'tau_{m}_fp32']:.3f}" if f"tau_{m}_int8" in e else "-"
                              for m in RUN_DRAFTERS)
            L.append(f"| {name}{' (shipped)' if e['shipped'] else ''} | {e['variant']} | "
                     f"{'yes' if e['root_conditioned'] else 'no'} | {e['scheme']} | {e['int8_bytes']/1e6:.2f} | "
                     f"{t1} | {t5} | {taus} | {e['train_seconds'] or '-'} |")
    if res.get("draft_ms_per_round"):
        L += ["", f"| device draft ms/round (heads + tree, budget {B}, median) | ms |", "|---|---|"]
        L += [f"| {k} | {v:.3f} |" for k, v in res["draft_ms_per_round"].items()]
    if res.get("head_ms"):
        L += ["", "| head-only ms per call (random weights, same shapes; int8 = per-channel) | value |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in res["head_ms"].items()]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
