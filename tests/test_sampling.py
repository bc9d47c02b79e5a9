"""Sampling is distribution-preserving under tree verification, and a seeded request's tokens
do not depend on the trees.

A tiny random Llama (vocab 8) makes the exact target distribution of the first two generated
tokens computable by enumeration, with transformers' own logits warpers as the reference for
temperature/top-k/top-p. Thousands of sessions, each verifying a deterministic draft tree,
must match it (chi-square); a deliberately lossy rule must fail the same test, which shows
the test has power. Since every draw is keyed by (seed, position), the same seed must give
the same tokens with any trees as decoding alone (edge_server.sampling).
"""
import json
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import (LlamaConfig, LlamaForCausalLM, LogitsProcessorList, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from edge_server.kv_cache import KVPool
from edge_server.sampling import Sampling, draw, processed_scores
from edge_server.session import Session
from edge_server.verifier import TargetModel
from shared.tree import TokenTree, TreeError

from conftest import ROOT

VOCAB = 8
PROMPT = [3, 1, 4]
PARAMS = Sampling(temperature=0.8, top_p=0.9, top_k=6)
SAMPLES = 2000


@pytest.fixture(scope="module")
def tiny():
    # a tiny model is latency-bound: extra threads only add contention on a shared 2-core box
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the logits so the distribution is far from uniform
        model.lm_head.weight.mul_(8.0)
    yield TargetModel(model, max_context=64)
    torch.set_num_threads(threads)


def _reference_probs(logits: torch.Tensor) -> torch.Tensor:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(PARAMS.temperature),
                                   TopKLogitsWarper(PARAMS.top_k), TopPLogitsWarper(PARAMS.top_p)])
    return torch.softmax(warpers(None, logits[None].float())[0], dim=-1)


def _exact_pairs(tiny: TargetModel) -> np.ndarray:
    """P(first two generated tokens) for plain sampling, by enumeration."""
    with torch.inference_mode():
        p1 = _reference_probs(tiny.model(torch.tensor([PROMPT])).logits[0, -1])
        joint = np.zeros((VOCAB, VOCAB))
        for a in range(VOCAB):
            if p1[a] > 0:
                p2 = _reference_probs(tiny.model(torch.tensor([PROMPT + [a]])).logits[0, -1])
                joint[a] = (p1[a] * p2).numpy()
    return joint


def _draft_tree(root: int) -> TokenTree:
    """Deterministic in the context: three children of the root, two grandchildren each."""
    kids = [(root + k) % VOCAB for k in (1, 2, 3)]
    tokens, parents = [root], [-1]
    for kid in kids:
        tokens.append(kid)
        parents.append(0)
        me = len(tokens) - 1
        for g in ((kid + 1) % VOCAB, (kid + 5) % VOCAB):
            tokens.append(g)
            parents.append(me)
    return TokenTree(tuple(tokens), tuple(parents))


def _sample_pairs(tiny: TargetModel, lossy: bool = False) -> np.ndarray:
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(SAMPLES):
        s = Session(PROMPT, Sampling(PARAMS.temperature, PARAMS.top_p, PARAMS.top_k, seed),
                    max_new_tokens=3, stop_ids=frozenset(), want_hidden=False)
        s.prefill(tiny)
        while len(s.generated) < 2:
            if lossy:  # accept the first drafted child whenever the target gives it >= 20%
                tree = _draft_tree(s.bonus)
                out = tiny.forward_tree(s.cache, s.committed, tree)
                scores = processed_scores(out.logits, PARAMS)
                path = [0, 1] if torch.softmax(scores[0], -1)[tree.tokens[1]] >= 0.2 else [0]
                s.committed = tiny.commit(s.cache, s.committed, path)
                bonus = draw(scores[path[-1]], seed, len(s.context) + len(path) - 1)
                s.generated.extend([tree.tokens[i] for i in path[1:]] + [bonus])
                continue
            s.verify(tiny, _draft_tree(s.bonus))
        counts[s.generated[0], s.generated[1]] += 1
    return counts


def _pvalue(counts: np.ndarray, exact: np.ndarray) -> float:
    expected = exact.ravel() * counts.sum()
    observed = counts.ravel()
    assert observed[expected == 0].sum() == 0, "sampled a pair the target cannot produce"
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_processed_probs_match_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    params = Sampling(temperature=0.7, top_p=0.8, top_k=10)
    ours = torch.softmax(processed_scores(logits, params), dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)])
    ref = torch.softmax(warpers(None, logits), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_nucleus_over_a_large_vocabulary_keeps_what_a_full_sort_keeps(top_p):
    """Rows whose nucleus needs a few to thousands of tokens: ranking only the likeliest tokens,
    widened as needed, keeps exactly the tokens a sort of the whole row keeps."""
    torch.manual_seed(1)
    logits = torch.cat([torch.randn(2, 20000) * 6, torch.randn(2, 20000) * 0.3])
    params = Sampling(temperature=0.9, top_p=top_p)
    scores = logits / 0.9
    ranked, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(ranked, dim=-1)
    dropped = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, probs.cumsum(-1) - probs >= top_p)
    ours = processed_scores(logits, params)
    assert torch.equal(torch.isinf(ours), dropped)
    assert torch.equal(ours[~dropped], scores[~dropped])
    assert (~dropped).sum(-1).max() > 64  # past the first ranking: it was widened


def test_tree_sampling_matches_target_distribution(tiny):
    exact = _exact_pairs(tiny)
    assert _pvalue(_sample_pairs(tiny), exact) > 1e-3


@pytest.fixture(scope="module")
def tiny_heads(tiny, tmp_path_factory):
    """Random low-rank heads for the tiny target, exported to ONNX and run by the device drafter."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from export_heads import export_onnx
    from heads_model import DraftHeads

    from device_client.drafters.heads import HeadsDrafter

    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("tiny-heads")
    export_onnx(DraftHeads(32, VOCAB, num_heads=2, rank=4), top_k=3, path=folder / "heads.onnx")
    (folder / "heads.json").write_text(json.dumps(
        {"hidden_size": 32, "vocab_size": VOCAB, "num_heads": 2, "top_k": 3, "onnx": "heads.onnx"}))
    return HeadsDrafter(folder, mode="dynamic", ngram=False)


def test_heads_trees_through_batched_path_match_target_distribution(tiny, tiny_heads):
    """The server's ragged batched path, drafting with ONNX heads on the hidden state it returns."""
    pool = KVPool.for_model(tiny.model, 4)
    counts = np.zeros((VOCAB, VOCAB))
    sizes = []
    for seed in range(SAMPLES):
        s = Session(PROMPT, Sampling(PARAMS.temperature, PARAMS.top_p, PARAMS.top_k, seed),
                    max_new_tokens=3, stop_ids=frozenset(), want_hidden=True)
        s.slot = pool.allocate(len(PROMPT) + 3 + 8)
        rows = [s.prefill_row(64)]
        logits, hidden = tiny.forward_rows(rows)
        result = s.after_prefill_row(rows[0], logits[0], hidden[0], tiny.max_context, 0.0)
        while len(s.generated) < 2:
            wire_hidden = result.hidden.numpy().astype(np.float16).astype(np.float32)
            tree = tiny_heads.propose(s.context, wire_hidden, budget=7)
            sizes.append(len(tree))
            rows = [s.tree_row(tree)]
            logits, hidden = tiny.forward_rows(rows)
            result = s.after_tree_row(tree, logits[0], hidden[0], tiny.max_context, 0.0)
        counts[s.generated[0], s.generated[1]] += 1
        pool.free(s.slot)
    assert np.mean(sizes) > 3  # the heads really drafted
    assert _pvalue(counts, _exact_pairs(tiny)) > 1e-3


def test_lossy_rule_fails_the_same_test(tiny):
    exact = _exact_pairs(tiny)
    assert _pvalue(_sample_pairs(tiny, lossy=True), exact) < 1e-6


def test_a_seed_gives_the_same_tokens_with_any_trees_as_decoding_alone(tiny):
    """The draw for a position depends on (seed, position) only: trees of any shape, accepted
    or not, leave a seeded request's tokens those of the target decoding alone."""
    rng = np.random.default_rng(3)
    outputs = set()
    for seed in range(40):
        params = Sampling(PARAMS.temperature, PARAMS.top_p, PARAMS.top_k, seed)
        runs = []
        for trees in (False, True):
            s = Session(PROMPT, params, max_new_tokens=12, stop_ids=frozenset(), want_hidden=False)
            s.prefill(tiny)
            while len(s.generated) < 12:
                tree = TokenTree.root_only(s.bonus)
                if trees:  # random trees: some nodes accepted, most not
                    tokens = [s.bonus, *rng.integers(VOCAB, size=6).tolist()]
                    parents = [-1, 0, 0, 1, 1, 2, 3]
                    try:
                        tree = TokenTree(tuple(tokens), tuple(parents))
                        tree.check_unique_siblings()
                    except TreeError:  # repeated siblings
                        tree = TokenTree.root_only(s.bonus)
                s.verify(tiny, tree)
            runs.append(s.generated[:12])
        assert runs[0] == runs[1], seed
        outputs.add(tuple(runs[0]))
    assert len(outputs) > 30  # different seeds, different samples


def test_draws_follow_the_processed_distribution():
    """Gumbel-max keyed by (seed, position): over many seeds a position's draws match softmax of
    the processed scores, and two positions of one seed are independent draws."""
    torch.manual_seed(0)
    scores = processed_scores(torch.randn(1, 12) * 2, Sampling(temperature=0.9, top_k=9))[0]
    probs = torch.softmax(scores, -1).double().numpy()
    counts = np.zeros((12, 12))
    for seed in range(6000):
        counts[draw(scores, seed, 100), draw(scores, seed, 101)] += 1
    for marginal in (counts.sum(1), counts.sum(0)):
        assert marginal[probs == 0].sum() == 0
        keep = probs > 0
        expected = probs[keep] / probs[keep].sum() * marginal.sum()
        assert chisquare(marginal[keep], expected).pvalue > 1e-3
    joint = np.outer(probs, probs)
    keep = joint.ravel() * counts.sum() >= 5
    obs, exp = counts.ravel()[keep], joint.ravel()[keep]
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
