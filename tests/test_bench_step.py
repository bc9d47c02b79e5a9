"""The step-cost benchmark: its trees are the shipped static tree's best nodes, and a tiny sweep
runs end to end on the real model."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_step  # noqa: E402


def test_heads_tree_is_the_static_trees_first_nodes():
    paths = json.loads(bench_step.HEADS_META.read_text())["static_tree"]["paths"]
    for k in (1, 4, 16):
        tree = bench_step.heads_tree(k)
        assert len(tree) == k
        # every node's rank path (read back from its placeholder id) is one of the first paths
        ranks = {tuple(tree.tokens[n] % 1000 for n in tree.path_to(i)[1:]) for i in range(1, k)}
        assert ranks <= {tuple(p) for p in paths[:k]}
        assert len(ranks) == k - 1


def test_a_tiny_sweep_writes_one_cell_per_rows_and_nodes(tmp_path):
    # its own process: the script sets torch's thread count and the allocator, as the server does
    subprocess.run([sys.executable, str(SCRIPTS / "bench_step.py"), "--past", "8", "--rows", "1", "2",
                    "--nodes", "1", "3", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["rows"], r["nodes"], r["tokens"]) for r in rows] == [(1, 1, 1), (1, 3, 3), (2, 1, 2), (2, 3, 6)]
    assert all(r["step_ms"] > 0 for r in rows)
    assert "step ms" in (tmp_path / "table.md").read_text()


def test_both_lm_heads_time_every_cell_twice(tmp_path):
    subprocess.run([sys.executable, str(SCRIPTS / "bench_step.py"), "--past", "8", "--rows", "1", "--nodes", "1", "2",
                    "--reps", "1", "--warmup", "0", "--lm-head", "both", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["lm_head"], r["nodes"]) for r in rows] == [("full", 1), ("full", 2), ("screened", 1), ("screened", 2)]
    assert all(r["vs_full"] == 1.0 for r in rows if r["lm_head"] == "full")
    assert all(r["vs_full"] > 0 for r in rows)


def test_both_forwards_time_every_cell_twice(tmp_path):
    subprocess.run([sys.executable, str(SCRIPTS / "bench_step.py"), "--past", "8", "--rows", "2", "--nodes", "1",
                    "--reps", "1", "--warmup", "0", "--forward", "both", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["forward"] for r in rows] == ["modules", "server"]
    assert rows[0]["vs_modules"] == 1.0 and rows[1]["vs_modules"] > 0
    assert "× modules" in (tmp_path / "table.md").read_text()
