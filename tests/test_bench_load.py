"""The load benchmark end to end on loopback: a tiny sweep, to keep the harness honest."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_load  # noqa: E402


def test_lengths_are_spread_the_same_for_every_call():
    a = bench_load.client_lengths(4, 3, 64, 0.5)
    assert a == bench_load.client_lengths(4, 3, 64, 0.5)
    flat = [x for row in a for x in row]
    assert len(a) == 4 and all(len(row) == 3 for row in a)
    assert all(32 <= x <= 96 for x in flat) and len(set(flat)) > 6
    assert bench_load.client_lengths(2, 2, 10, 0.0) == [[10, 10], [10, 10]]


def test_a_tiny_sweep_with_spread_lengths_does_the_same_work_per_method(server, tmp_path):
    bench_load.main(["--server", server.address, "--clients", "2", "--methods", "server-ar", "none", "--max-new-tokens", "6",
                     "--requests", "2", "--length-spread", "0.5", "--warmup-tokens", "0", "--no-plot", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    expected = sum(x for row in bench_load.client_lengths(2, 2, 6, 0.5) for x in row)
    assert [r["tokens"] for r in res["rows"]] == [expected, expected]
    assert res["lossless"] == []
    assert "(1 ± 0.5) per request" in (tmp_path / "table.md").read_text()


def test_context_puts_a_different_slice_of_notes_before_each_prompt():
    bare = bench_load.client_prompts(2, 2)
    long = bench_load.client_prompts(2, 2, context_tokens=500)
    assert bare == [[bench_load.PROMPTS[0], bench_load.PROMPTS[2]], [bench_load.PROMPTS[1], bench_load.PROMPTS[3]]]
    for b_row, l_row in zip(bare, long):
        for b, lp in zip(b_row, l_row):
            assert lp.endswith(b) and 2150 < len(lp) - len(b) < 2250
    notes = {lp.split("\n\n")[1] for row in long for lp in row}
    assert len(notes) == 4


def test_a_sweep_with_context_reports_its_prompt_length(server, tmp_path):
    bench_load.main(["--server", server.address, "--clients", "1", "--methods", "server-ar", "--max-new-tokens", "4",
                     "--context-tokens", "300", "--warmup-tokens", "0", "--no-plot", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert 250 < res["rows"][0]["prompt_tokens_mean"] < 450
    assert "(about 300 tokens of notes before each)" in (tmp_path / "table.md").read_text()


def test_a_sampled_sweep_gives_every_method_the_same_tokens(server, tmp_path):
    """With --temperature every prompt is sampled with a seed of its own; speculation must still
    reproduce server-only decoding's tokens (edge_server.sampling), which the lossless check
    compares, also for a prompt that another client sends at another N."""
    bench_load.main(["--server", server.address, "--clients", "1", "2", "--methods", "server-ar", "ngram",
                     "--max-new-tokens", "12", "--requests", "2", "--temperature", "0.9", "--seed", "5",
                     "--warmup-tokens", "0", "--no-plot", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["lossless"] == [] and [r["tokens"] for r in res["rows"]] == [24, 24, 48, 48]
    notes = (tmp_path / "table.md").read_text()
    assert "sampling: temperature 0.9, top-p 1, seed 5 + the prompt's CRC-32" in notes
