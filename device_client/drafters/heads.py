"""Medusa-style ONNX draft heads on the device (onnxruntime + numpy; no torch).

The artifact folder holds `heads.json` (metadata) and the ONNX graph it names (int8 by
default). Each round the server's hidden state at the node before the root, and the root token
itself (the bonus token the server just returned, `context[-1]`) when the graph takes a `root`
input (root-conditioned heads, heads.json format 2; older hidden-only graphs still load), go
through the heads once; their top-k candidates become a token tree:

- mode "static": the topology calibrated at training time (heads.json `static_tree.paths`,
  rank paths chosen to maximise expected accepted length for its node budget), cut to the
  round's budget in its best-first order;
- mode "dynamic": best nodes by cumulative head log-probability under the round's budget;
  with `ngram=True`, prompt-lookup continuations (the ngram drafter's) are merged in first,
  taking at most `ngram_share` of the budget, and the heads fill the rest;
- mode "unified": one best-first tree over head candidates and (with `ngram=True`) prompt
  lookups below every node, each scored by its calibrated probability of acceptance
  (heads.json `tree_calibration`, written by scripts/calibrate_tree.py; see
  tree_builders.unified_tree). No fixed share: the budget goes where acceptance is likelier.
  The only mode that knows those chances, so the only one that leaves out the nodes below
  the server's prices (`node_prices`);
- mode "auto": "unified" when heads.json has `tree_calibration`, else "dynamic". Artifacts
  from before the calibration existed keep loading and draft as they always did, but not
  silently: the drafter warns once and says so in `fallback` (None when nothing fell back).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from device_client.tree_builders import (
    AcceptanceModel,
    dynamic_tree,
    merge_trees,
    node_paths,
    tree_from_topology,
    unified_tree,
)
from shared.tree import TokenTree

METADATA = "heads.json"


def load_metadata(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / METADATA
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the heads drafter needs an artifact folder with {METADATA} and the "
            "ONNX heads (train them with scripts/train_heads.py or fetch them from the server)"
        )
    return json.loads(path.read_text())


class HeadsDrafter:
    needs_hidden_state = True

    def __init__(
        self,
        artifact_dir: str | os.PathLike,
        mode: str = "dynamic",
        ngram: bool = False,
        threads: int = 1,
        model_file: str | None = None,
        ngram_share: float = 0.25,
        max_depth: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if mode not in ("static", "dynamic", "unified", "auto"):
            raise ValueError(f"mode must be 'static', 'dynamic', 'unified' or 'auto', not {mode!r}")
        self.artifact_dir = Path(artifact_dir)
        self.meta = load_metadata(self.artifact_dir)
        self.acceptance, self.fallback = self._acceptance_model(mode)
        mode = mode if mode != "auto" else "unified" if self.acceptance else "dynamic"
        self.mode = mode
        self.ngram = ngram
        self.ngram_share = ngram_share
        self.max_depth = max_depth
        self.name = f"heads-{mode}" + ("+ngram" if ngram else "")
        self.hidden_size = int(self.meta["hidden_size"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.num_heads = int(self.meta["num_heads"])
        self.top_k = int(self.meta["top_k"])
        self.topology = [tuple(p) for p in self.meta.get("static_tree", {}).get("paths", [])]
        if mode == "static" and not self.topology:
            raise ValueError(f"{self.artifact_dir / METADATA} has no static_tree; use mode='dynamic'")
        onnx_file = self.artifact_dir / (model_file or self.meta.get("onnx", "heads.int8.onnx"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in self.session.get_inputs()}
        self.takes_root = "root" in inputs
        self.takes_heads = "heads" in inputs  # graphs from before it always compute every head
        self._ngram = self._index = None
        if ngram:
            from device_client.drafters.ngram import NgramDrafter, NgramIndex

            if self.mode == "unified":  # one index: the tree's n-gram features and the fallback's paths
                f = self.acceptance.features
                self._index = NgramIndex(f.max_n, f.max_occurrences, f.copy_window)
            self._ngram = NgramDrafter(max_ngram=4, min_ngram=2, depth=8, index=self._index)

    def _acceptance_model(self, mode: str) -> tuple[AcceptanceModel | None, str | None]:
        """The calibrated acceptance model for mode unified/auto, and why it fell back if it did."""
        cal = self.meta.get("tree_calibration")
        if mode not in ("unified", "auto"):
            return None, None
        if cal is not None:
            return AcceptanceModel.from_json(cal), None
        where = self.artifact_dir / METADATA
        if mode == "unified":
            raise ValueError(f"{where} has no tree_calibration (run scripts/calibrate_tree.py); use mode='dynamic'")
        why = (f"{where} has no tree_calibration: drafting dynamic trees with a fixed ngram share "
               "(add the calibration with scripts/calibrate_tree.py)")
        warnings.warn(why, stacklevel=3)
        return None, why

    def candidates(self, hidden: np.ndarray, root: int, heads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids [n, k] and log-probs [n, k] of the first n = `heads` heads (None: all) for
        one hidden state [hidden_size] and the round's root token (used by root-conditioned
        graphs only). Graphs without the `heads` input compute all K and return them all."""
        h = np.asarray(hidden, dtype=np.float32).reshape(1, -1)
        if h.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden state has {h.shape[1]} values but the heads expect {self.hidden_size}; "
                "the heads belong to another model"
            )
        feeds = {"hidden": h}
        if self.takes_root:
            if not 0 <= root < self.vocab_size:
                raise ValueError(f"root token {root} is outside the heads' vocabulary of {self.vocab_size}")
            feeds["root"] = np.array([root], dtype=np.int64)
        if self.takes_heads:
            feeds["heads"] = np.array([min(heads or self.num_heads, self.num_heads)], dtype=np.int64)
        ids, lps = self.session.run(None, feeds)
        return ids[0], lps[0]

    def propose(self, context: Sequence[int], hidden: np.ndarray | None, budget: int,
                node_prices: Sequence[float] = ()) -> TokenTree:
        root = int(context[-1])
        if budget <= 1:
            return TokenTree.root_only(root)
        if hidden is None:  # no hidden state (e.g. a resumed session): ngram or nothing
            if self._ngram is not None:
                return self._ngram.propose(context, None, budget)
            return TokenTree.root_only(root)
        # a tree of `budget` nodes is at most budget - 1 deep: the heads past that would go unused
        ids, lps = self.candidates(hidden, root, budget - 1)
        if self.mode == "unified":
            return unified_tree(context, ids, lps, budget, self.acceptance, self._index, node_prices)
        if self.mode == "static":
            tree = tree_from_topology(root, self.topology, ids, budget)
        else:
            tree = dynamic_tree(root, ids, lps, budget, self.max_depth)
        if self._ngram is None:
            return tree
        share = max(0, int(budget * self.ngram_share))
        if share < 2:
            return tree
        ng = self._ngram.propose(context, None, share)
        if len(ng) <= 1:
            return tree
        return merge_trees(root, node_paths(ng), tree, budget)
