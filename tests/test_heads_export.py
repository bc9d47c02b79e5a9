"""ONNX export of the draft heads: fp32 parity with torch, int8 quantization, device drafter,
root conditioning (the graph's `root` input really changes the drafts; hidden-only graphs load).

Uses tiny random heads (no trained artifact, no target model), so it runs in seconds in CI.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from export_heads import ExportGraph, export_onnx, ort_session, quantize, run_onnx  # noqa: E402
from heads_model import DraftHeads, TopKHeads  # noqa: E402

D, V, K, TOPK = 48, 700, 3, 6


def _heads(rank, root_conditioned=True, dense=0, shared=False):
    """Random heads; C (and the dense rows) set nonzero, as trained heads' are, so they matter."""
    torch.manual_seed(0)
    m = DraftHeads(D, V, K, rank, root_conditioned=root_conditioned, dense_tokens=dense, dense_shared=shared)
    for blk in m.blocks:
        torch.nn.init.normal_(blk[0].linear.weight, std=0.1)
    if root_conditioned:
        torch.nn.init.normal_(m.C, std=0.5)
    if dense:
        m.dense_ids.copy_(torch.randperm(V)[:dense])
        torch.nn.init.normal_(m.D, std=0.5)
    return m.eval()


def _inputs(n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)).astype(np.float32), rng.integers(0, V, size=n)


def _write_artifact(tmp: Path, onnx_path: Path, rank) -> Path:
    meta = {"hidden_size": D, "vocab_size": V, "num_heads": K, "rank": rank or 0, "top_k": TOPK,
            "onnx": onnx_path.name, "model_fingerprint": "test",
            "static_tree": {"budget": 8, "paths": [[0], [1], [0, 0], [0, 1], [2], [0, 0, 0], [1, 0]]}}
    (tmp / "heads.json").write_text(json.dumps(meta))
    return tmp


@pytest.mark.parametrize("rank,dense,shared", [(8, 0, False), (None, 0, False), (8, 40, False), (8, 40, True)])
@pytest.mark.parametrize("root_conditioned", [True, False])
def test_onnx_fp32_matches_torch(tmp_path, rank, dense, shared, root_conditioned):
    m = _heads(rank, root_conditioned, dense, shared)
    path = export_onnx(m, TOPK, tmp_path / "heads.fp32.onnx")
    names = [i.name for i in ort_session(path).get_inputs()]
    assert names == (["hidden", "root", "heads"] if root_conditioned else ["hidden", "heads"])
    h, root = _inputs(32, 0)
    with torch.no_grad():
        ref_ids, ref_lp = TopKHeads(m, TOPK)(torch.from_numpy(h), torch.from_numpy(root))
        g_ids, g_lp = ExportGraph(m, TOPK)(torch.from_numpy(h), torch.from_numpy(root))
    assert torch.equal(ref_ids, g_ids)
    ids, lp = run_onnx(ort_session(path), h, root, K)
    assert ids.shape == (32, K, TOPK) and lp.shape == (32, K, TOPK)
    assert (ids[..., 0] == ref_ids.numpy()[..., 0]).all()
    np.testing.assert_allclose(lp, ref_lp.numpy(), atol=1e-4)
    assert (np.diff(lp, axis=-1) <= 1e-6).all()  # sorted best first
    for n in range(1, K):  # the first n heads alone: the same candidates as with all of them
        few, few_lp = run_onnx(ort_session(path), h, root, n)
        assert few.shape == (32, n, TOPK) and (few == ids[:, :n]).all()
        np.testing.assert_allclose(few_lp, lp[:, :n], atol=1e-5)


def test_root_changes_the_drafts_and_zero_c_is_plain_medusa():
    m = _heads(8)
    h, root = _inputs(16, 3)
    ht, rt = torch.from_numpy(h), torch.from_numpy(root)
    with torch.no_grad():
        a, b = m(ht, rt), m(ht, (rt + 1) % V)
        assert (a - b).abs().amax(-1).min() > 1e-3  # every row and head depends on the root
        m.C.zero_()  # the untrained state: exactly the plain heads, whatever the root
        plain = DraftHeads(D, V, K, 8, root_conditioned=False)
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "C"})
        assert torch.equal(m(ht, rt), plain(ht)) and torch.equal(m(ht, rt), m(ht, torch.full_like(rt, -1)))


@pytest.mark.parametrize("shared", [False, True])
def test_dense_rows_change_only_the_frequent_tokens_logits(shared):
    m = _heads(8, dense=40, shared=shared)
    h, root = _inputs(16, 4)
    ht, rt = torch.from_numpy(h), torch.from_numpy(root)
    with torch.no_grad():
        a = m(ht, rt)
        m.D.zero_()
        b = m(ht, rt)
    changed = ((a - b).abs() > 1e-6).any(0).any(0)
    assert set(torch.nonzero(changed).flatten().tolist()) == set(m.dense_ids.tolist())


def _matmul_weight_types(graph) -> set[int]:
    """The ONNX data types of the quantized MatMuls' weights (set() when there are none)."""
    types = {i.name: i.data_type for i in graph.initializer}
    return {types[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger"}


@pytest.mark.parametrize("scheme", ["int8-per-channel", "int8-per-tensor", "int8-u-fp16"])
@pytest.mark.parametrize("dense,shared", [(0, False), (40, False), (40, True)])
def test_int8_quantization_is_smaller_and_agrees(tmp_path, scheme, dense, shared):
    import onnx

    m = _heads(16, dense=dense, shared=shared)
    fp32 = export_onnx(m, TOPK, tmp_path / "heads.fp32.onnx")
    h, root = _inputs(128, 1)
    ref, _ = run_onnx(ort_session(fp32), h, root, K)
    q = quantize(fp32, tmp_path / f"heads.{scheme}.onnx", scheme)
    assert q.stat().st_size < fp32.stat().st_size
    # U is stored once: the root Gather reads the quantized (or fp16) U, no fp32 copy is left
    graph = onnx.load(str(q)).graph
    big_fp32 = [i.name for i in graph.initializer if i.data_type == 1 and np.prod(i.dims) > V]
    assert big_fp32 == []
    # weights as uint8: ORT's uint8 x int8 kernels saturate on x86 CPUs without VNNI (AVX2)
    assert _matmul_weight_types(graph) == {onnx.TensorProto.UINT8}
    ids, _ = run_onnx(ort_session(q), h, root, K)
    assert (ids[..., 0] == ref[..., 0]).mean() > 0.8
    # the true top-1 stays among the quantized top candidates
    assert np.mean([ref[i, k, 0] in ids[i, k] for i in range(len(h)) for k in range(K)]) > 0.95
    # and the quantized graph still follows the root
    other, _ = run_onnx(ort_session(q), h, (root + 1) % V, K)
    assert (other[..., 0] != ids[..., 0]).mean() > 0.3


@pytest.mark.parametrize("root_conditioned", [True, False])
def test_device_drafter_runs_without_torch(tmp_path, root_conditioned):
    """Root-conditioned graphs get context[-1] as the root; hidden-only (format 1) graphs still work."""
    m = _heads(8, root_conditioned)
    path = export_onnx(m, TOPK, tmp_path / "heads.fp32.onnx")
    _write_artifact(tmp_path, path, 8)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # importing torch now fails
        sys.modules["transformers"] = None
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from device_client.drafters.heads import HeadsDrafter
        h = np.random.default_rng(0).standard_normal({D}).astype(np.float32)
        ctx = [5, 6, 7, 5, 6, 7, 5, 6]
        for mode in ("static", "dynamic"):
            for ng in (False, True):
                d = HeadsDrafter({str(tmp_path)!r}, mode=mode, ngram=ng, threads=1)
                assert d.needs_hidden_state
                t = d.propose(ctx, h, 8)
                assert 1 < len(t) <= 8 and t.tokens[0] == 6, (mode, ng, t)
                t.check_unique_siblings()
                assert len(d.propose(ctx, h, 1)) == 1
        t = HeadsDrafter({str(tmp_path)!r}, mode="dynamic", ngram=True).propose(ctx, h, 16)
        assert 7 in [t.tokens[c] for c in t.children()[0]]  # the ngram continuation is a branch
        d = HeadsDrafter({str(tmp_path)!r}, mode="dynamic")
        assert d.takes_root == {root_conditioned}
        a, b = d.candidates(h, 6)[0], d.candidates(h, 7)[0]
        assert (a != b).any() == {root_conditioned}  # the root is context[-1]; plain heads ignore it
        assert (d.propose(ctx, h, 8).tokens[1:] == d.propose(ctx[:-1] + [7], h, 8).tokens[1:]) != {root_conditioned}
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_drafter_computes_only_the_heads_a_budget_can_reach(tmp_path):
    """A tree of b nodes is at most b - 1 deep, so the drafter asks the graph for the first b - 1
    heads; in fp32, where those heads' outputs do not depend on how many run, every tree mode
    drafts exactly the trees that a graph without the `heads` input (an older artifact, which
    computes all K) gives (int8 differs slightly: the activations' quantization scale spans the
    heads computed)."""
    import onnx
    from onnx import helper, numpy_helper

    from device_client.drafters.heads import HeadsDrafter
    from device_client.tree_builders import AcceptanceModel, TreeFeatures

    path = export_onnx(_heads(8, dense=40, shared=True), TOPK, tmp_path / "h.onnx")
    f = TreeFeatures(num_heads=K)
    calibration = AcceptanceModel(f, *(tuple(np.linspace(-1, 1, n)) for n in f.sizes), -0.5)
    old = tmp_path / "old"  # the same graph as artifacts from before the input: `heads` fixed at K
    old.mkdir()
    model = onnx.load(str(path))
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "heads"))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["heads"], value=numpy_helper.from_array(np.array([K]))))
    onnx.save(model, str(old / "h.onnx"))
    for folder, graph in ((tmp_path, path), (old, old / "h.onnx")):
        _write_artifact(folder, graph, 8)
        meta = json.loads((folder / "heads.json").read_text())
        (folder / "heads.json").write_text(json.dumps({**meta, "tree_calibration": calibration.to_json()}))
    h = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    ctx = [5, 6, 7, 5, 6, 7, 5, 6]
    for mode in ("static", "dynamic", "unified"):
        few, every = HeadsDrafter(tmp_path, mode, True, 1), HeadsDrafter(old, mode, True, 1)
        assert few.takes_heads and not every.takes_heads
        asked, run = [], few.session.run
        few.session.run = lambda out, feeds: asked.append(int(feeds["heads"][0])) or run(out, feeds)
        for budget in (2, 3, 4, 8):
            assert few.propose(ctx, h, budget) == every.propose(ctx, h, budget), (mode, budget)
        assert asked == [1, 2, 3, K], mode


def test_drafter_rejects_wrong_hidden_size(tmp_path):
    from device_client.drafters.heads import HeadsDrafter

    m = _heads(8)
    _write_artifact(tmp_path, export_onnx(m, TOPK, tmp_path / "h.onnx"), 8)
    d = HeadsDrafter(tmp_path, "dynamic", False, 1)
    with pytest.raises(ValueError, match="hidden state"):
        d.propose([1, 2], np.zeros(D + 1, np.float32), 8)


def test_unified_mode_needs_the_calibration_and_auto_falls_back_loudly(tmp_path):
    """mode="auto" drafts unified trees when heads.json has tree_calibration; an older artifact
    without it still drafts (dynamic, fixed ngram share) but warns and says so in `fallback`."""
    from device_client.drafters.heads import HeadsDrafter
    from device_client.tree_builders import AcceptanceModel, TreeFeatures

    _write_artifact(tmp_path, export_onnx(_heads(8), TOPK, tmp_path / "h.onnx"), 8)
    with pytest.warns(UserWarning, match="tree_calibration"):
        d = HeadsDrafter(tmp_path, "auto", True, 1)
    assert d.mode == "dynamic" and "tree_calibration" in d.fallback and d.name == "heads-dynamic+ngram"
    with pytest.raises(ValueError, match="tree_calibration"):
        HeadsDrafter(tmp_path, "unified", True, 1)

    f = TreeFeatures(num_heads=K)
    zero = AcceptanceModel(f, *(tuple([0.0] * n) for n in f.sizes), -1.0)
    meta = json.loads((tmp_path / "heads.json").read_text())
    (tmp_path / "heads.json").write_text(json.dumps({**meta, "tree_calibration": zero.to_json()}))
    h = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    ctx = [5, 6, 7, 5, 6, 7, 5, 6]
    for ng in (False, True):
        d = HeadsDrafter(tmp_path, "auto", ng, 1)
        assert d.mode == "unified" and d.fallback is None
        for budget in (1, 2, 8, 16):
            t = d.propose(ctx, h, budget)
            assert len(t) == budget and t.tokens[0] == 6
            t.check_unique_siblings()
    assert 7 in [t.tokens[c] for c in t.children()[0]]  # the lookup's continuation is a branch


def test_unified_heads_keep_one_ngram_index_and_draft_from_it_without_a_hidden_state(tmp_path):
    """A round with no hidden state (e.g. a resumed session) drafts n-gram paths alone, from the
    same index the unified tree keeps over the context."""
    from device_client.drafters.heads import HeadsDrafter
    from device_client.tree_builders import AcceptanceModel, TreeFeatures

    f = TreeFeatures(num_heads=K)
    zero = AcceptanceModel(f, *(tuple([0.0] * n) for n in f.sizes), -1.0)
    _write_artifact(tmp_path, export_onnx(_heads(8), TOPK, tmp_path / "h.onnx"), 8)
    meta = json.loads((tmp_path / "heads.json").read_text())
    (tmp_path / "heads.json").write_text(json.dumps({**meta, "tree_calibration": zero.to_json()}))
    d = HeadsDrafter(tmp_path, "unified", True, 1)
    assert d._ngram.index is d._index
    ctx = [5, 6, 7, 5, 6, 7, 5, 6]
    d.propose(ctx, np.random.default_rng(0).standard_normal(D).astype(np.float32), 8)
    assert d._index.tokens == ctx  # the unified tree indexed the context
    assert d.propose(ctx + [7], None, 4).tokens == (7, 5, 6, 7)  # extended, then looked up


def test_shipped_heads_fit_the_size_limit_and_heads_json_describes_the_graph():
    """The artifact every device downloads: at most 8 MB (issue 3), one low-rank U, uint8 weights
    (export_heads.unsigned_weights), and dense rows in the graph exactly when heads.json says so."""
    import onnx

    art = ROOT / "edge_server" / "heads" / "smollm2-135m-instruct"
    meta = json.loads((art / "heads.json").read_text())
    graph = art / meta["onnx"]
    assert graph.stat().st_size <= 8_000_000
    model = onnx.load(str(graph))
    ops = {n.op_type for n in model.graph.node}
    assert ("ScatterElements" in ops) == bool(meta.get("dense_tokens"))
    dims = [tuple(i.dims) for i in model.graph.initializer]
    assert (meta["rank"], meta["vocab_size"]) in dims  # U^T, stored once
    assert _matmul_weight_types(model.graph) == {onnx.TensorProto.UINT8}  # exact on CPUs without VNNI too
    assert [i.name for i in model.graph.input] == [i["name"] for i in meta["inputs"]]
    if meta.get("dense_tokens"):
        rows = (meta["hidden_size"], meta["dense_tokens"])  # D^T, one per head or one shared
        assert dims.count(rows) == (1 if meta["dense_shared"] else meta["num_heads"])
