"""scripts/calibrate_tree.py: the rows it fits on, and that the fit recovers known probabilities."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from calibrate_tree import calibration_rows, fit_acceptance  # noqa: E402
from device_client.tree_builders import TreeFeatures  # noqa: E402


def test_fit_recovers_the_acceptance_of_each_feature_cell():
    f = TreeFeatures(num_heads=2)
    rng = np.random.default_rng(0)
    hs, ns, cs = f.sizes
    true_h, true_n = rng.normal(0, 1.5, hs), rng.normal(0, 1.5, ns)
    cells = [(h, n, int(n < ns - 1)) for h in range(0, hs, 3) for n in range(0, ns, 4)]
    rows = []
    for h, n, c in cells:
        p = 1 / (1 + np.exp(-(-0.5 + true_h[h] + true_n[n])))
        rows += [(h, n, c, bool(y)) for y in rng.random(4000) < p]
    m = fit_acceptance(rows, f, l2=0.01)
    for h, n, c in cells:
        want = 1 / (1 + np.exp(-(-0.5 + true_h[h] + true_n[n])))
        got = 1 / (1 + np.exp(-(m.bias + m.head[h] + m.ngram[n] + m.copy[c])))
        assert got == pytest.approx(want, abs=0.03)


def test_rows_follow_the_true_continuation_while_it_is_a_candidate():
    f = TreeFeatures(num_heads=2)
    seq = np.array([1, 2, 3, 4, 1, 2, 3, 9, 9], dtype=np.int32)
    start = 5  # first round: committed seq[:6], root 2, target continuation 3, 9, 9
    m = len(seq) - start - 1
    ids = np.tile(np.array([[3, 7], [8, 7]]), (m, 1, 1))  # head 0 proposes 3; head 1 misses 9
    lps = np.log(np.full((m, 2, 2), 0.4))
    rows = calibration_rows(seq, start, ids, lps, f)
    first = rows[:2]
    # depth 1 of the first round: candidates 3 (head rank 0 and the lookup after (1, 2)) and 7
    assert sorted(r[3] for r in first) == [False, True]
    hit = next(r for r in first if r[3])
    assert hit[1] == (2 - 1) * 4 + 0 and hit[2] > 0  # a unanimous 2-gram continuation, copy bucket set
    # depth 2: the lookup continues with 4, the head with 8/7; the target 9 is none: the walk stops
    assert len(rows[2:5]) == 3 and not any(r[3] for r in rows[2:5])
    # two more rounds, depth 1 only: root 3 (3, 7 and the lookup's 4), root 9 (3, 7; 9 has no successor yet)
    assert len(rows) == 5 + 3 + 2 and not any(r[3] for r in rows[5:])
