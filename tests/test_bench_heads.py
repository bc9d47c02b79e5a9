"""The offline tau simulation's bookkeeping: the eval set cut to its first tokens and split by source."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_heads  # noqa: E402
from device_client.drafters.ngram import NgramDrafter  # noqa: E402


def _data():
    rng = np.random.default_rng(0)
    starts = np.array([5, 9, 3])
    seqs = [np.concatenate([rng.integers(0, 50, s), np.tile([7, 8, 9], 30)]).astype(np.int32) for s in starts]
    return seqs, [np.zeros((len(s), 4), np.float16) for s in seqs], starts


def test_first_tokens_counts_only_the_first_generated_tokens():
    data = _data()
    whole = bench_heads.simulate(NgramDrafter(), data, 16)
    cut = bench_heads.simulate(NgramDrafter(), bench_heads.first_tokens(data, 20), 16)
    # the first generated token comes with the prefill; rounds gain the other 19 of each response
    assert cut["tokens"] == 3 * 19
    assert whole["tokens"] == sum(len(s) - st - 1 for s, st in zip(data[0], data[2]))
    assert cut["tau"] < whole["tau"]  # the repetition ngram lookup catches grows along a response


def test_by_source_keeps_each_prompt_with_its_own_start():
    data = _data()
    parts = bench_heads.by_source(data, np.array(["a", "b", "a"]))
    assert sorted(parts) == ["a", "b"]
    seqs, _, starts = parts["a"]
    assert [len(s) for s in seqs] == [len(data[0][0]), len(data[0][2])] and list(starts) == [5, 3]


def test_head_variant_names_round_trip():
    import pytest

    for meta in ({"rank": 64}, {"rank": 0}, {"rank": 64, "dense_tokens": 1024},
                 {"rank": 32, "dense_tokens": 4096, "dense_shared": True}):
        name = bench_heads.variant_name(meta)
        assert bench_heads.parse_variant(name) == (meta["rank"], meta.get("dense_tokens", 0),
                                                   meta.get("dense_shared", False))
    assert bench_heads.variant_name({"rank": 64, "dense_tokens": 4096, "dense_shared": True}) == "r64s4096"
    with pytest.raises(ValueError, match="expected r<rank>"):
        bench_heads.parse_variant("64")
