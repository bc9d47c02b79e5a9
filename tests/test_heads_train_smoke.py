"""A few training steps on a tiny random Llama target: data rows, loss goes down, resume works,
the root-conditioned heads learn to use the root."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_head_data  # noqa: E402
import train_heads  # noqa: E402

V, D, K = 96, 32, 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, V, size=int(rng.integers(4, 9))).tolist() for _ in range(24)]
    gens = build_head_data.generate(model, prompts, 24, {2}, 2)
    full = [p + g for p, g in zip(prompts, gens)]
    rows = [build_head_data.make_rows(f, len(p) - 1, h)
            for (h, am), f, p in zip(build_head_data.hidden_states(model, full, 2), full, prompts)]
    # the LM head's argmax at every response position is the next token (greedy data)
    (h0, am0), = build_head_data.hidden_states(model, full[:1], 2)
    assert (am0[len(prompts[0]) - 1:-1] == np.asarray(full[0][len(prompts[0]):])).all()
    for part, sl in (("train", slice(0, 18)), ("heldout", slice(18, 24))):
        H, N, L = (np.concatenate([r[i] for r in rows[sl]]) for i in range(3))
        np.savez(out / f"{part}_00000.npz", hidden=H, nxt=N, labels=L, agree=np.array(0), sources=np.array(["x"]))
    return out, model.get_output_embeddings().weight.detach().float().clone()


def test_make_rows_labels_are_shifted_by_two_plus_head():
    seq = list(range(10, 20))
    h = np.arange(10, dtype=np.float32)[:, None].repeat(4, 1)
    H, N, L = build_head_data.make_rows(seq, 3, h)
    assert H[0, 0] == 3 and N[0] == 14 and L[0, 0] == 15 and L[0, 1] == 16
    assert (L[-1] == -1).all() and N[-1] == 19


def test_load_split_roots(tmp_path):
    """Generated rows keep their root (`nxt`); teacher-forced corpus rows get -1 (unknown)."""
    rows = lambda n, nxt: dict(hidden=np.zeros((n, D), np.float16), nxt=np.full(n, nxt, np.int32),  # noqa: E731
                               labels=np.full((n, 8), 5, np.int32))
    np.savez(tmp_path / "train_00000.npz", **rows(3, 7))
    np.savez(tmp_path / "corpus_00000.npz", **rows(2, 9))
    H, N, L = train_heads.load_split(tmp_path, "train", K, distill_repeat=2)
    assert len(H) == len(L) == 8 and L.shape[1] == K
    assert sorted(N.tolist()) == [-1, -1] + [7] * 6


@pytest.mark.parametrize("root_conditioned,dense,shared", [(True, 0, False), (False, 0, False), (True, 16, False),
                                                         (True, 16, True)])
def test_training_smoke_and_resume(tiny_data, tmp_path, root_conditioned, dense, shared):
    data, lm_head = tiny_data
    H, N, L = train_heads.load_split(data, "train", K)
    Hv, Nv, Lv = train_heads.load_split(data, "heldout", K)
    assert (N >= 0).all() and len(N) == len(H)
    cfg = {"hidden_size": D, "vocab_size": V, "num_heads": K, "rank": 8, "num_layers": 1,
           "root_conditioned": root_conditioned, "dense_tokens": dense, "dense_shared": shared}
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), seed=0, lr=3e-3, batch=32, steps=40, epochs=1,
                              decay=0.8, ckpt_every=10, max_minutes=0, restart=False)
    from heads_model import build_heads, head_loss

    init = build_heads(cfg)
    init.init_from_lm_head(lm_head, train_heads.frequent_tokens(L, dense, V) if dense else None)
    h, root, lab = torch.from_numpy(H.astype(np.float32)), torch.from_numpy(N).long(), torch.from_numpy(L)
    with torch.no_grad():
        before = head_loss(init(h, root), lab)[0].item()
    heads = train_heads.train(args, cfg, lm_head, H, N, L, Hv, Nv, Lv, "cpu")
    with torch.no_grad():
        after = head_loss(heads(h, root), lab)[0].item()
        other = heads(h, (root + 1) % V)
    assert after < before
    if dense:  # the dense rows trained too, and stayed on the training labels' most frequent tokens
        assert not torch.equal(heads.D, init.D) and torch.equal(heads.dense_ids, init.dense_ids)
        assert set(heads.dense_ids.tolist()) <= set(L[L >= 0].ravel().tolist())
    if root_conditioned:  # C started at zero; training made the heads use the root
        assert heads.C.abs().max() > 0
        assert (other - heads(h, root)).abs().amax(-1).mean() > 1e-3
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 40 and ck["final"]
    # rerunning resumes from the checkpoint and does no more steps
    again = train_heads.train(args, cfg, lm_head, H, N, L, Hv, Nv, Lv, "cpu")
    for a, b in zip(heads.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    acc = train_heads.evaluate(heads, Hv, Nv, Lv, "cpu")
    assert len(acc["top1"]) == K and all(0 <= x <= 1 for x in acc["top5"])


def test_low_rank_init_is_truncated_svd(tiny_data):
    _, lm_head = tiny_data
    from heads_model import DraftHeads

    m = DraftHeads(D, V, K, rank=D)  # full rank SVD reproduces the LM head exactly
    err = m.init_from_lm_head(lm_head)
    assert err < 1e-4
    h, root = torch.randn(4, D), torch.arange(4)
    with torch.no_grad():
        np.testing.assert_allclose(m(h, root)[:, 0].numpy(), (h @ lm_head.t()).numpy(), atol=1e-3)


@pytest.mark.parametrize("shared", [False, True])
def test_dense_rows_start_as_the_lm_head_on_the_frequent_tokens(tiny_data, shared):
    _, lm_head = tiny_data
    from heads_model import DraftHeads

    labels = np.array([[5, 7, 7], [7, 9, -1], [5, 7, 11]])
    ids = train_heads.frequent_tokens(labels, 3, V)
    assert ids.tolist() == [7, 5, 9]  # by count, ties by id
    m = DraftHeads(D, V, K, rank=4, dense_tokens=3, dense_shared=shared)
    m.init_from_lm_head(lm_head, ids)
    h, root = torch.randn(6, D), torch.arange(6)
    with torch.no_grad():
        out, ref = m(h, root), h @ lm_head.t()
    for k in range(K):  # every head starts as the exact LM head on the dense rows, rank 4 elsewhere
        torch.testing.assert_close(out[:, k, ids], ref[:, ids], atol=1e-4, rtol=1e-4)
    assert (out[:, 0, 20:] - ref[:, 20:]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="frequent tokens"):
        DraftHeads(D, V, K, rank=4, dense_tokens=3).init_from_lm_head(lm_head)


def test_full_rank_root_table_is_the_svd_left_factor(tiny_data):
    """The full-rank variant's own root table starts as what U would be (a fair comparison)."""
    _, lm_head = tiny_data
    from heads_model import ROOT_EMBED_RANK, DraftHeads

    width = min(D, ROOT_EMBED_RANK)  # the tiny target's hidden size is below 64
    full, low = DraftHeads(D, V, K, rank=None), DraftHeads(D, V, K, rank=width)
    assert full.init_from_lm_head(lm_head) == 0.0
    low.init_from_lm_head(lm_head)
    assert full.E.shape == (V, width)
    assert torch.equal(full.E, low.U)
    torch.testing.assert_close(full.W[0], lm_head)


def test_open_prompts_ask_about_topics_without_text_to_copy():
    src = {"news": [{"text": "word " * 60}],
           "wiki": [{"title": "Alchemy", "text": "Alchemy is an ancient tradition. " * 10}],
           "chat": [{"text": "Do you like pizza?", "topic": "food"}],
           "code": [{"title": "f", "text": 'def f(x):\n    """Return the square of x. Examples follow.\n    """\n'}]}
    default = build_head_data.build_prompts(src, 0)
    assert {p["source"] for p in default} == {"news", "wiki", "chat", "code", "open"}  # what the shipped heads saw
    opened = build_head_data.build_prompts(src, 0, ("open",))
    assert {p["source"] for p in opened} == {"open"} and len(opened) == 5  # two per topic, one per task
    texts = " ".join(p["prompt"] for p in opened)
    assert "Alchemy" in texts and "food" in texts and "Return the square of x." in texts
    assert "ancient tradition" not in texts and "pizza" not in texts  # nothing to copy from


def test_training_refuses_data_built_from_other_sources(tmp_path):
    four = {"train_prompts_by_source": {"news": 3, "wiki": 2, "code": 1, "chat": 4}}
    with pytest.raises(SystemExit, match="--sources chat,code,news,wiki"):
        train_heads.check_sources(four, "", tmp_path)  # the default asks for all five
    train_heads.check_sources(four, "--sources news,wiki,code,chat", tmp_path)
    train_heads.check_sources({**four, "train_prompts_by_source": {**four["train_prompts_by_source"], "open": 1}},
                              "--max-new 96", tmp_path)
