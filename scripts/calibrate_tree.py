"""Calibrate the unified tree builder and store the calibration in an artifact's heads.json.

    python scripts/calibrate_tree.py [--artifact-dir edge_server/heads/smollm2-135m-instruct]
                                     [--data-dir /tmp/edgespec-train/data] [--dry-run]

The unified builder (device_client.tree_builders.unified_tree) scores every candidate child by
P(accepted | parent accepted) from an additive-logit model over three features (head depth and
log-prob bin, ngram match length and kind, the session's copy rate). This script fits that model
on the held-out split that build_head_data.py wrote (never on eval.npz, where bench_heads.py
reports tau), with the artifact's own graph run exactly as the device runs it, and writes it to
heads.json `tree_calibration` (everything else in heads.json is kept as it is).

The held-out shards hold each response's rows (hidden state, next token, labels) but not the
prompt, which prompt lookup needs; the prompts are rebuilt from prompts.json with the target's
tokenizer and chat template exactly as build_head_data.py built them, and checked against the
shards (sources in the shard's order, each row's next token = the previous row's first label).

Rows: for every held-out round position and every depth along the true continuation, as long as
the continuation stays among the candidates (so the parent could have been in a tree), each
candidate child of the true-prefix node is one row: its features, and whether it is the target's
token. The tree multiplies these conditionals along a path, so they are fitted conditionally.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from device_client.drafters.heads import HeadsDrafter  # noqa: E402
from device_client.drafters.ngram import NgramIndex  # noqa: E402
from device_client.tree_builders import AcceptanceModel, TreeFeatures  # noqa: E402

SHIPPED = ROOT / "edge_server" / "heads" / "smollm2-135m-instruct"
Sequences = tuple[list[np.ndarray], list[np.ndarray], np.ndarray]  # seqs, hidden, starts (as bench_heads.load_eval)


def heldout_sequences(data_dir: Path, tokenizer, max_prompt_tokens: int = 256, batch: int = 32) -> Sequences:
    """Prompt + response token sequences of the held-out split, with the hidden state at every
    response row (zeros before the prompt's last token, which no round reads)."""
    from build_head_data import _chat_ids

    held = json.loads((data_dir / "prompts.json").read_text())["heldout"]
    seqs, hids, starts = [], [], []
    for ci in range((len(held) + batch - 1) // batch):
        if not (data_dir / f"heldout_{ci:05d}.npz").exists():  # build_head_data.py --heldout-chunks
            continue
        chunk, d = held[ci * batch:(ci + 1) * batch], np.load(data_dir / f"heldout_{ci:05d}.npz")
        ids = [_chat_ids(tokenizer, p["prompt"], max_prompt_tokens) for p in chunk]
        order = np.argsort([len(x) for x in ids])  # build_head_data.py sorts each chunk by prompt length
        if list(d["sources"]) != [chunk[j]["source"] for j in order]:
            raise SystemExit(f"heldout_{ci:05d}.npz does not match prompts.json (batch {batch}?)")
        nxt, lab, hidden = d["nxt"], d["labels"], d["hidden"]
        ends = np.flatnonzero(lab[:, 0] == -1)  # a response's last row has no label
        if len(ends) != len(chunk) or not (lab[:-1, 0][lab[:-1, 0] >= 0] == nxt[1:][lab[:-1, 0] >= 0]).all():
            raise SystemExit(f"heldout_{ci:05d}.npz rows are not whole responses")
        b = 0
        for k, e in enumerate(ends):
            prompt = ids[order[k]]
            seq = np.array(prompt + nxt[b:e + 1].tolist(), dtype=np.int32)
            h = np.zeros((len(seq), hidden.shape[1]), np.float16)
            h[len(prompt) - 1:len(seq) - 1] = hidden[b:e + 1]
            seqs.append(seq)
            hids.append(h)
            starts.append(len(prompt))
            b = e + 1
    return seqs, hids, np.array(starts)


def round_candidates(drafter: HeadsDrafter, seq: np.ndarray, hidden: np.ndarray, start: int):
    """The heads' (ids, logprobs) for every round that can start in `seq` (committed seq[:c],
    c = start+1 .. len-1), one call each: int8 graphs quantize activations per call, so batching
    would change the candidates."""
    out = [drafter.candidates(hidden[c - 2], int(seq[c - 1])) for c in range(start + 1, len(seq))]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def calibration_rows(seq: np.ndarray, start: int, ids: np.ndarray, lps: np.ndarray, features: TreeFeatures,
                     max_depth: int = 12) -> list[tuple[int, int, int, bool]]:
    """(head, ngram, copy feature, is the target's token) for every candidate child of every
    true-prefix node that could be in a tree (see the module docstring)."""
    toks, rows = seq.tolist(), []
    index = NgramIndex(features.max_n, features.max_occurrences, features.copy_window)
    for c in range(start + 1, len(toks)):
        index.sync(toks[:c])
        I, P, rate = ids[c - start - 1], lps[c - start - 1], index.copy_rate()
        for depth in range(min(max_depth, len(toks) - c)):  # children at depth+1; target toks[c + depth]
            ng = index.candidates(toks[max(0, c + depth - features.max_n):c + depth])
            feats = features.encode(depth, I, P, ng, rate)
            rows += [(*f, t == toks[c + depth]) for t, f in feats.items()]
            if toks[c + depth] not in feats:
                break
    return rows


def fit_acceptance(rows: list[tuple[int, int, int, bool]], features: TreeFeatures, l2: float = 1.0,
                   iters: int = 60) -> AcceptanceModel:
    """Logistic regression z = bias + head[f_h] + ngram[f_n] + copy[f_c] (L2 on the tables), by
    damped Newton on the rows aggregated per distinct feature triple."""
    a = np.asarray(rows, dtype=np.int64)
    cells, inv = np.unique(a[:, :3], axis=0, return_inverse=True)
    inv = inv.ravel()
    tot, hit = np.bincount(inv).astype(float), np.bincount(inv, weights=a[:, 3].astype(float))
    sizes = features.sizes
    offs = np.concatenate([[0], np.cumsum(sizes)])
    X = np.zeros((len(cells), offs[-1] + 1))
    X[:, -1] = 1.0
    for g in range(3):
        X[np.arange(len(cells)), offs[g] + cells[:, g]] = 1.0
    reg = np.full(X.shape[1], l2)
    reg[-1] = 0.0

    def loss(w: np.ndarray) -> float:
        z = X @ w
        return float((tot * np.logaddexp(0, z) - hit * z).sum() + 0.5 * (reg * w * w).sum())

    w = np.zeros(X.shape[1])
    w[-1] = np.log(hit.sum() / (tot.sum() - hit.sum()))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        step = np.linalg.solve((X * (tot * p * (1 - p))[:, None]).T @ X + np.diag(reg + 1e-6),
                               X.T @ (tot * p - hit) + reg * w)
        f0, t = loss(w), 1.0
        while loss(w - t * step) > f0 and t > 1e-4:
            t /= 2
        w -= t * step
        if np.abs(t * step).max() < 1e-7:
            break
    tables = [tuple(w[offs[g]:offs[g + 1]].tolist()) for g in range(3)]
    return AcceptanceModel(features, *tables, float(w[-1]))


def calibrate(artifact_dir: Path, data: Sequences, threads: int = 1) -> tuple[AcceptanceModel, dict]:
    """Fit the acceptance model for the artifact's graph on `data` (held-out sequences)."""
    meta = json.loads((artifact_dir / "heads.json").read_text())
    features = TreeFeatures(num_heads=int(meta["num_heads"]))
    drafter = HeadsDrafter(artifact_dir, "dynamic", False, threads)
    rows: list = []
    t0 = time.time()
    for seq, hid, s in zip(*data):
        ids, lps = round_candidates(drafter, seq, hid, int(s))
        rows += calibration_rows(seq, int(s), ids, lps, features)
    model = fit_acceptance(rows, features)
    y = np.array([r[3] for r in rows], dtype=float)
    info = {"data": "held-out split (build_head_data.py heldout_*.npz + prompts.json), never eval.npz",
            "sequences": len(data[0]), "round_positions": int(sum(len(q) - s - 1 for q, s in zip(data[0], data[2]))),
            "rows": len(rows), "accept_rate": round(float(y.mean()), 4)}
    print(f"calibrated on {info['round_positions']} positions in {time.time() - t0:.1f} s")
    return model, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact-dir", default=str(SHIPPED))
    ap.add_argument("--data-dir", default="/tmp/edgespec-train/data")
    ap.add_argument("--model", default="default", help="the target whose tokenizer built the data")
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="as build_head_data.py was run")
    ap.add_argument("--batch", type=int, default=32, help="as build_head_data.py was run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="fit and print, leave heads.json alone")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from edge_server.model_store import resolve_model_path

    art, data_dir = Path(args.artifact_dir), Path(args.data_dir)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    data = heldout_sequences(data_dir, tok, args.max_prompt_tokens, args.batch)
    model, info = calibrate(art, data, args.threads)
    cal = {**model.to_json(), "fitted_on": info}
    print(json.dumps(cal["fitted_on"]), f"bias {model.bias:.3f}")
    if args.dry_run:
        return 0
    path = art / "heads.json"
    meta = json.loads(path.read_text())
    meta["tree_calibration"] = cal
    path.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {path} tree_calibration")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
