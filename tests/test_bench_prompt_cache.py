"""The prompt cache benchmark's prompts and ratios (its servers are the real ones; a run takes minutes)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_prompt_cache as bench  # noqa: E402


def test_every_question_comes_after_the_same_notes():
    prompts = bench.questions(3, 2, 200)
    assert len(prompts) == 3 and all(len(row) == 2 for row in prompts)
    flat = [p for row in prompts for p in row]
    assert len({p.split("\n\n")[1] for p in flat}) == 1  # one document
    assert len(set(flat)) == 4  # clients ask PROMPTS i, i+1: questions 0-3
    assert prompts[0][1] == prompts[1][0]


def test_ratios_compare_on_and_off_of_the_same_repeat():
    def row(cache, repeat, first, later, request, tps):
        return dict(clients=4, cache=cache, repeat=repeat, ttft_ms_first=first, ttft_ms_later=later,
                    request_s_later=request, tokens_per_s=tps)
    rows = [row("on", 0, 100.0, 10.0, 1.0, 40.0), row("off", 0, 400.0, 90.0, 6.0, 10.0),
            row("off", 1, 300.0, 50.0, 3.0, 20.0), row("on", 1, 100.0, 10.0, 1.0, 40.0)]
    bench.add_ratios(rows)
    assert [(r["ttft_first_off_over_on"], r["ttft_off_over_on"], r["request_off_over_on"],
             r["tokens_per_s_on_over_off"]) for r in rows if r["cache"] == "on"] == [(4.0, 9.0, 6.0, 4.0),
                                                                                   (3.0, 5.0, 3.0, 2.0)]
    on = next(r for r in bench.median_rows(rows) if r["cache"] == "on")
    assert on["ttft_off_over_on"] == 7.0 and on["tokens_per_s_on_over_off"] == 3.0
