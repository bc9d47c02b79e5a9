"""One command: data -> train -> export -> quantize -> calibrate -> artifacts.

    python scripts/train_heads.py                       # the shipped recipe: default model, rank 48 + 6,144 dense rows, 4 heads
    python scripts/train_heads.py --rank 0 --run-dir /tmp/edgespec-train/runs/full --no-artifact
    python scripts/train_heads.py --plain --run-dir /tmp/edgespec-train/runs/r64-plain --no-artifact

Steps (each resumable; rerunning skips what is done):
 1. data: scripts/build_head_data.py (corpus prompts, the target's greedy responses, fp32
    hidden-state cache as float16) under --data-dir;
 2. train Medusa-1 heads on the cache (frozen target, loss sum_k 0.8^k CE_k), seeded,
    checkpointed to --run-dir every --ckpt-every steps, CUDA if present, bf16 autocast where the
    server would run bf16 (CUDA, CPUs with native bf16), fp32 elsewhere (emulated bf16 made a
    step 15x slower on an AVX2 host);
    the heads are conditioned on the round's root token (the token at t+1) unless --plain;
 3. per-head top-1/top-5 accuracy on the held-out split;
 4. ONNX fp32 export + parity vs torch; int8 quantization, scheme chosen by measured tau on the
    eval prompts (the smallest file whose tau is within --max-tau-drop of fp32);
 5. calibration of per-(depth, rank) acceptance on the held-out split with the int8 graph and
    the static tree topology for --tree-budget nodes;
 6. artifacts: heads.int8.onnx + heads.json in --artifact-dir (default:
    edge_server/heads/<model>/ for the default model);
 7. the unified tree builder's acceptance calibration on the held-out split
    (scripts/calibrate_tree.py, heads.json `tree_calibration`).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from heads_model import DraftHeads, build_heads, head_loss  # noqa: E402

DEFAULT_ARTIFACTS = ROOT / "edge_server" / "heads" / "smollm2-135m-instruct"


def load_split(data_dir: Path, part: str, K: int, limit: int | None = None, distill_repeat: int = 1):
    """Rows (hidden, root, labels) of one split; for "train" also the teacher-forced corpus
    shards, with the self-distilled (generated) rows repeated `distill_repeat` times.

    The root is the token at t+1, what the device feeds root-conditioned heads. In generated
    rows it is the token the labels follow. In teacher-forced corpus rows the labels are the
    target's argmax after each *text* token, while `nxt` there is the target's argmax at t,
    which differs from the text token at t+1 wherever the target would not have written the
    text (the shards do not keep the text token). A root that the labels do not follow would
    teach the heads to distrust the root, so corpus rows get root -1 ("unknown": no root
    embedding) and train the heads on h_t alone, as plain Medusa heads."""
    globs = [f"{part}_*.npz"] + (["corpus_*.npz"] if part == "train" else [])
    files = sorted(f for g in globs for f in data_dir.glob(g) if ".tmp" not in f.name)
    if not files:
        raise SystemExit(f"no {part} shards in {data_dir}; run scripts/build_head_data.py first")
    H, N, L = [], [], []
    for f in files:
        d = np.load(f)
        rep = distill_repeat if f.name.startswith("train_") else 1
        root = np.full(len(d["nxt"]), -1, np.int64) if f.name.startswith("corpus_") else d["nxt"].astype(np.int64)
        for _ in range(rep):
            H.append(d["hidden"]); N.append(root); L.append(d["labels"][:, :K])
    H, N, L = np.concatenate(H), np.concatenate(N), np.concatenate(L)
    keep = L[:, 0] >= 0  # positions with at least head 0's label
    H, N, L = H[keep], N[keep], L[keep]
    if limit:
        H, N, L = H[:limit], N[:limit], L[:limit]
    return H, N, L


@functools.cache
def _has_bf16(device: str) -> bool:
    """bf16 where the hardware has it: an AVX2-only CPU emulates bf16 products, and a training
    step (rank 48, batch 256, 2 threads) took 18.8 s there against 1.3 s in fp32."""
    from edge_server.hardware import pick_dtype

    return pick_dtype("auto", device) == torch.bfloat16


def _autocast(device: str) -> torch.autocast:
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=_has_bf16(device))


@torch.no_grad()
def evaluate(heads: DraftHeads, H: np.ndarray, N: np.ndarray, L: np.ndarray, device: str, batch: int = 256) -> dict:
    """Per-head top-1/top-5 accuracy of the torch heads on rows (hidden, root, labels)."""
    heads.eval()
    K = heads.num_heads
    c1 = np.zeros(K); c5 = np.zeros(K); n = np.zeros(K)
    for i in range(0, len(H), batch):
        h = torch.from_numpy(H[i:i + batch].astype(np.float32)).to(device)
        root = torch.from_numpy(N[i:i + batch]).to(device).long()
        lab = torch.from_numpy(L[i:i + batch]).to(device).long()
        with _autocast(device):
            logits = heads(h, root)
        top = logits.float().topk(5, dim=-1).indices
        for k in range(K):
            ok = lab[:, k] >= 0
            n[k] += ok.sum().item()
            c1[k] += (top[ok, k, 0] == lab[ok, k]).sum().item()
            c5[k] += (top[ok, k, :] == lab[ok, k, None]).any(-1).sum().item()
    heads.train()
    return {"top1": (c1 / np.maximum(n, 1)).round(4).tolist(), "top5": (c5 / np.maximum(n, 1)).round(4).tolist(),
            "positions": int(n[0])}


def frequent_tokens(labels: np.ndarray, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent label ids (all heads' labels, ties by id): the tokens that get dense rows."""
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=vocab_size)
    return torch.from_numpy(np.argsort(-counts, kind="stable")[:n].astype(np.int64))


def train(args, cfg: dict, lm_head: torch.Tensor, H: np.ndarray, N: np.ndarray, L: np.ndarray,
          Hv: np.ndarray | None, Nv: np.ndarray | None, Lv: np.ndarray | None, device: str) -> DraftHeads:
    """Train (or resume) heads on rows (hidden H, root N, labels L); held-out rows for logging."""
    from tqdm import tqdm

    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ck_path = run / "checkpoint.pt"
    torch.manual_seed(args.seed)
    heads = build_heads(cfg)
    dense = cfg.get("dense_tokens", 0)
    svd_err = heads.init_from_lm_head(lm_head, frequent_tokens(L, dense, cfg["vocab_size"]) if dense else None)
    heads.to(device).train()
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(H) / args.batch)
    total = args.steps or int(args.epochs * steps_per_epoch)
    warm = min(50, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    step = 0
    log = []
    if ck_path.exists() and not args.restart:
        ck = torch.load(ck_path, map_location=device, weights_only=False)
        if ck["config"] == cfg and ck.get("total") == total:
            heads.load_state_dict(ck["heads"]); opt.load_state_dict(ck["opt"]); sched.load_state_dict(ck["sched"])
            step, log = ck["step"], ck.get("log", [])
            print(f"resuming at step {step}/{total}")
    print(f"train positions {len(H)}, steps {total} ({steps_per_epoch}/epoch), batch {args.batch}, "
          f"rank {cfg['rank'] or 'full'}, svd rel. error {svd_err:.3f}, device {device}")

    def save(final=False):
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"config": cfg, "heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "total": total, "log": log, "final": final}, tmp)
        tmp.replace(ck_path)

    Ht = torch.from_numpy(H)  # float16 in memory; cast per batch
    Nt = torch.from_numpy(N).long()
    Lt = torch.from_numpy(L).long()
    bar = tqdm(total=total, initial=step, desc=f"train r={cfg['rank'] or 'full'}")
    t0 = time.time()
    while step < total:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(H), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for b in range(step % steps_per_epoch, steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * args.batch:(b + 1) * args.batch]
            h = Ht[idx].to(device, torch.float32)
            lab = Lt[idx].to(device)
            with _autocast(device):
                logits = heads(h, Nt[idx].to(device))
            loss, per = head_loss(logits, lab, args.decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step(); sched.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", h0=f"{per[0]:.2f}")
            if step % args.ckpt_every == 0 or step == total:
                if Hv is not None and (step % (args.ckpt_every * 4) == 0 or step == total):
                    acc = evaluate(heads, Hv[:2048], Nv[:2048], Lv[:2048], device)
                    log.append({"step": step, "loss": float(loss.detach()), "heldout": acc, "elapsed_s": time.time() - t0})
                    bar.write(f"step {step}: loss {loss.item():.3f} held-out top1 {acc['top1']} top5 {acc['top5']}")
                save(final=step == total)
            if args.max_minutes and time.time() - t0 > args.max_minutes * 60 and step < total:
                save()
                bar.write(f"time limit: stopping after {args.max_minutes} min at step {step}/{total} "
                          "and going on with these weights (rerun with the same arguments to resume)")
                bar.close()
                return heads.eval()
    bar.close()
    save(final=True)
    return heads.eval()


def check_sources(summary: dict, data_args: str, data_dir: Path) -> None:
    """An existing data folder is reused as it is, so refuse one built from other prompt sources
    than this command asks for: the heads would silently learn other text."""
    import build_head_data

    asked = set(build_head_data.parse_args(data_args.split()).sources)
    built = set(summary.get("train_prompts_by_source", {}))
    if built and built != asked:
        have = ",".join(sorted(built))
        raise SystemExit(f"{data_dir} holds data built from the sources {have}, not {','.join(sorted(asked))}: "
                         f"pass a new --data-dir to build it, or --data-args '--sources {have}' to train on it")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data-dir", default="/tmp/edgespec-train/data")
    ap.add_argument("--run-dir", default=None, help="default /tmp/edgespec-train/runs/r<rank>")
    ap.add_argument("--artifact-dir", default=None)
    ap.add_argument("--no-artifact", action="store_true", help="keep outputs in the run dir only")
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=48, help="0 = full rank (d -> V per head)")
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--dense-tokens", type=int, default=6144,
                    help="full-rank rows for this many of the most frequent label tokens (0: none; full rank has all)")
    ap.add_argument("--dense-shared", action=argparse.BooleanOptionalAction, default=True,
                    help="one set of dense rows for all heads (--no-dense-shared: one per head)")
    ap.add_argument("--plain", action="store_true", help="plain Medusa heads (no root conditioning): the baseline")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=1200,
                    help="optimizer steps (1,200: the shipped heads and the full-rank comparison); 0 = --epochs")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--distill-repeat", type=int, default=2, help="weight of self-distilled vs corpus rows")
    ap.add_argument("--decay", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--max-minutes", type=float, default=0)
    ap.add_argument("--restart", action="store_true")
    ap.add_argument("--tree-budget", type=int, default=64)
    ap.add_argument("--schemes", default="int8-per-channel,int8-u-fp16,int8-per-tensor")
    ap.add_argument("--max-tau-drop", type=float, default=0.02)
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-args", default="", help="extra arguments for build_head_data.py")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data_dir = Path(args.data_dir)
    args.run_dir = args.run_dir or f"/tmp/edgespec-train/runs/r{args.rank or 'full'}"
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)

    # 1. data
    if not (data_dir / "summary.json").exists():
        import build_head_data

        build_head_data.main(["--model", args.model, "--out", str(data_dir), "--seed", str(args.seed),
                              *args.data_args.split()])
    summary = json.loads((data_dir / "summary.json").read_text())
    check_sources(summary, args.data_args, data_dir)

    from edge_server.model_store import load_model, model_fingerprint

    lm = load_model(args.model, torch.float32, "cpu")
    lm_head = lm.model.get_output_embeddings().weight.detach().float().clone()
    fingerprint = model_fingerprint(lm.model)
    if summary.get("model_fingerprint") not in (None, fingerprint):
        raise SystemExit(f"{data_dir} was built for model {summary['model_fingerprint']}, not {fingerprint}")
    dense = args.dense_tokens if args.rank else 0  # full rank has every row already
    cfg = {"hidden_size": lm_head.shape[1], "vocab_size": lm_head.shape[0], "num_heads": args.num_heads,
           "rank": args.rank, "num_layers": args.num_layers, "root_conditioned": not args.plain,
           "dense_tokens": dense, "dense_shared": args.dense_shared and dense > 0}
    del lm

    # 2. train
    H, N, L = load_split(data_dir, "train", args.num_heads, distill_repeat=args.distill_repeat)
    Hv, Nv, Lv = load_split(data_dir, "heldout", args.num_heads)
    t_train = time.time()
    heads = train(args, cfg, lm_head, H, N, L, Hv, Nv, Lv, device)
    train_s = time.time() - t_train
    heads = heads.to("cpu").float().eval()
    steps_done = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
    train_positions = len(H)
    del H, N, L

    # 3. accuracy
    acc = evaluate(heads, Hv, Nv, Lv, "cpu")
    print("held-out accuracy", json.dumps(acc))

    # 4. export, parity, quantization by measured tau
    from bench_heads import simulate_tau, write_variant
    from export_heads import export_onnx, parity, quantize, run_onnx, ort_session

    fp32 = export_onnx(heads, args.top_k, run / "heads.fp32.onnx")
    probe, probe_root = Hv[:1024].astype(np.float32), Nv[:1024]
    par_fp32 = parity(heads, fp32, probe, probe_root, args.top_k)
    print("onnx fp32 vs torch", par_fp32)
    inputs = [{"name": "hidden", "dtype": "float32", "shape": ["batch", cfg["hidden_size"]],
               "semantics": "target final hidden state (post-norm) at the node before the root"}]
    if heads.root_conditioned:
        inputs.append({"name": "root", "dtype": "int64", "shape": ["batch"],
                       "semantics": "the round's root token (the bonus token the server returned), i.e. the "
                                    "token after the hidden state's position"})
    inputs.append({"name": "heads", "dtype": "int64", "shape": [1],
                   "semantics": "how many heads to compute (1..num_heads), the first ones: a tree of b nodes "
                                "is at most b - 1 deep"})
    meta = {
        "format": 2,
        "model": summary.get("model", args.model if args.model != "default" else "smollm2-135m-instruct"),
        "model_fingerprint": fingerprint,
        "hidden_size": cfg["hidden_size"], "vocab_size": cfg["vocab_size"], "num_heads": cfg["num_heads"],
        "rank": cfg["rank"], "num_layers": cfg["num_layers"], "root_conditioned": cfg["root_conditioned"],
        "dense_tokens": cfg["dense_tokens"], "dense_shared": cfg["dense_shared"],
        "top_k": args.top_k, "inputs": inputs,
        "outputs": {"ids": "int64 [batch, heads, top_k]", "logprobs": "float32 [batch, heads, top_k]"},
        "head_offsets": [2 + k for k in range(cfg["num_heads"])],
        "training": {"data": summary, "epochs": args.epochs, "steps": args.steps, "steps_done": steps_done,
                     "train_rows": train_positions, "batch": args.batch,
                     "lr": args.lr, "decay": args.decay, "distill_repeat": args.distill_repeat, "seed": args.seed,
                     "objective": "Medusa-1 self-distillation" + (
                         "; heads conditioned on the root token (teacher-forced corpus rows: root unknown)"
                         if heads.root_conditioned else ""),
                     "train_seconds": round(train_s, 1), "threads": torch.get_num_threads(), "device": device},
        "heldout_accuracy": acc,
    }
    # calibration (fp32 graph) gives a provisional static tree for tau comparisons between schemes
    from device_client.tree_builders import expected_accepted, measure_acceptance, static_topology

    def calibrate(onnx_path: Path) -> dict:
        ids, _ = run_onnx(ort_session(onnx_path, threads=2), Hv.astype(np.float32), Nv, cfg["num_heads"])
        accm = measure_acceptance(ids, Lv)
        topo = static_topology(accm, args.tree_budget)
        return {"budget": args.tree_budget, "acceptance": accm.round(4).tolist(),
                "paths": [list(p) for p in topo], "expected_tokens_per_round": round(expected_accepted(topo, accm), 3),
                "calibration_positions": int(len(Hv))}

    meta["static_tree"] = calibrate(fp32)
    variants = {"fp32": write_variant(run / "variant-fp32", fp32, meta)}
    taus = {"fp32": simulate_tau(data_dir / "eval.npz", variants["fp32"], "dynamic", args.tree_budget)["tau"]}
    print(f"tau fp32 (dynamic, budget {args.tree_budget}): {taus['fp32']:.3f}")
    chosen = None
    quant_report = {}
    for scheme in [s for s in args.schemes.split(",") if s]:
        try:
            q = quantize(fp32, run / f"heads.{scheme}.onnx", scheme)
        except Exception as e:  # a scheme the installed onnxruntime/optimum lacks
            print(f"scheme {scheme} failed: {e}")
            continue
        vdir = write_variant(run / f"variant-{scheme}", q, meta)
        tau = simulate_tau(data_dir / "eval.npz", vdir, "dynamic", args.tree_budget)["tau"]
        par = parity(heads, q, probe, probe_root, args.top_k)
        size = q.stat().st_size
        quant_report[scheme] = {"bytes": size, "tau_dynamic": round(tau, 4), "top1_agreement_vs_torch": par["top1_agreement"]}
        print(f"{scheme}: {size/1e6:.2f} MB, tau {tau:.3f} ({tau / taus['fp32'] - 1:+.2%}), top-1 agreement {par['top1_agreement']:.4f}")
        # among the graphs that fit and hold tau, ship the smallest: tau is what the device gains,
        # bytes are what every device downloads (top-1 agreement with torch says neither)
        if size <= args.max_bytes and tau >= taus["fp32"] * (1 - args.max_tau_drop):
            if chosen is None or size < quant_report[chosen]["bytes"]:
                chosen = scheme
    if chosen is None and quant_report:
        fits = [s for s in quant_report if quant_report[s]["bytes"] <= args.max_bytes]
        chosen = max(fits or quant_report, key=lambda s: quant_report[s]["tau_dynamic"])
        print(f"no scheme held tau within {args.max_tau_drop:.0%}; taking {chosen}")
    int8 = run / f"heads.{chosen}.onnx"
    shutil.copy(int8, run / "heads.int8.onnx")

    # 5. calibration with the shipped graph
    meta["static_tree"] = calibrate(run / "heads.int8.onnx")
    meta["quantization"] = {"scheme": chosen, "candidates": quant_report, "tau_fp32_dynamic": round(taus["fp32"], 4),
                            "parity_onnx_fp32_vs_torch": par_fp32}
    meta["onnx"] = "heads.int8.onnx"

    # 6. artifacts
    out_dir = run / "artifact" if args.no_artifact else Path(args.artifact_dir or DEFAULT_ARTIFACTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "heads.int8.onnx", out_dir / "heads.int8.onnx")
    (out_dir / "heads.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copy(fp32, run / "artifact-fp32.onnx")
    # 7. the unified tree's acceptance calibration (heads.json tree_calibration), on the held-out split
    import calibrate_tree

    calibrate_tree.main(["--artifact-dir", str(out_dir), "--data-dir", str(data_dir), "--model", args.model])
    print(f"wrote {out_dir}: heads.int8.onnx ({(out_dir / 'heads.int8.onnx').stat().st_size/1e6:.2f} MB), heads.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
