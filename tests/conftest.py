"""Fixtures: the real embedded model, and a real edge-server process on 127.0.0.1."""
from __future__ import annotations

import os
import queue
import shlex
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France? Answer in one sentence.",
    "List three primary colors.",
    "Explain photosynthesis to a child in two sentences.",
    "Translate 'good morning' into Spanish and French.",
    "Write a haiku about the sea.",
    "What is 12 times 7? Show your work.",
    "Give me a JSON object with keys name and age for a person named Ada who is 36.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


class Stream:
    """A hand-driven Generate stream: send messages one at a time."""

    def __init__(self, stub, first):
        self.q = queue.Queue()
        self.q.put(first)
        self.replies = stub.Generate(iter(self.q.get, None), timeout=120)

    def send(self, msg):
        self.q.put(msg)

    def close(self):
        self.q.put(None)


def prometheus_samples(text: str) -> dict:
    """Prometheus text as {name{label=value}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(pred, timeout=30.0) -> bool:
    """Polls `pred` until it holds (True) or `timeout` seconds pass (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def loaded():
    import torch

    from edge_server.model_store import load_model

    torch.manual_seed(0)
    return load_model("default", torch.float32, "cpu")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def target(request, loaded):
    """The target model in fp32 and in bf16, for in-process scheduler tests of exactness."""
    import torch

    from edge_server.model_store import load_model
    from edge_server.verifier import TargetModel

    dtype = getattr(torch, request.param)
    model = loaded.model if dtype == torch.float32 else load_model("default", dtype, "cpu").model
    return TargetModel(model, max_context=8192)


class Served:
    """The target's own greedy continuation as the test server computes it.

    fp32: transformers' generate() on the same weights (the server's fp32 steps match it).
    Reduced precision (bf16 by default on a CPU with native bf16, see
    edge_server.hardware.pick_dtype): one-token greedy decoding through the server's own batched
    forward, prompt in the server's chunks. There every step's numbers come from the kernels
    that make a tree node bitwise a decoding step (edge_server.one_token_attention), which
    transformers' bf16 attention does not use, so its greedy text can differ in a near-tie.
    The reference runs on the server's device: a CUDA server (scripts/gpu_check.sh) is held to
    the target's greedy output on CUDA, not to a CPU's rounding."""

    def __init__(self, loaded, dtype: str, device: str = "cpu", prefill_chunk: int = 128):
        import torch

        from edge_server.kv_cache import KVPool
        from edge_server.model_store import load_model
        from edge_server.verifier import TargetModel

        if dtype == "float32" and device != "cpu":
            loaded = load_model("default", torch.float32, device)
        self.loaded, self.chunk = loaded, prefill_chunk
        self.target = None
        if dtype != "float32":
            model = load_model("default", getattr(torch, dtype), device).model
            self.target = TargetModel(model, max_context=8192)
            self.pool = KVPool.for_model(model, 64)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        import torch

        if self.target is None:
            with torch.inference_mode():
                model = self.loaded.model
                prompt = torch.tensor([ids], device=model.device)
                out = model.generate(prompt, do_sample=False, max_new_tokens=n,
                                     attention_mask=torch.ones_like(prompt))
            return out[0, len(ids):].tolist()
        return self._decode_alone(ids, n)

    def _decode_alone(self, ids: list[int], n: int) -> list[int]:
        """A lone server-ar session, one step at a time: the server's own rows and limits."""
        from edge_server.sampling import Sampling
        from edge_server.session import Session
        from shared.protocol import pb
        from shared.tree import TokenTree

        eos = self.target.model.generation_config.eos_token_id
        stops = frozenset({eos} if isinstance(eos, int) else eos or [])
        s = Session(list(ids), Sampling(), n, stops, want_hidden=False)
        s.slot = self.pool.allocate(len(ids) + n)
        ctx = self.target.max_context
        try:
            done = None
            while done is None:
                row = s.prefill_row(self.chunk)
                logits, hidden = self.target.forward_rows([row])
                done = s.after_prefill_row(row, logits[0], hidden[0], ctx, 0.0)
            while s.finish == pb.FINISH_NONE:
                tree = TokenTree.root_only(s.bonus)
                logits, hidden = self.target.forward_rows([s.tree_row(tree)])
                s.after_tree_row(tree, logits[0], hidden[0], ctx, 0.0)
            return s.generated
        finally:
            self.pool.free(s.slot)


@pytest.fixture(scope="session")
def served(loaded, client) -> Served:
    return Served(loaded, client[1].dtype, client[1].device)


@pytest.fixture(scope="session")
def server():
    from edge_server.launcher import ServerProcess

    # --fixed-budget: every speculative round verifies a real tree (the load-aware budget could
    # settle at 1, where the server decodes alone); the budget controller has its own tests.
    # --threads 1: the benchmarks' server, whose fp32 products run on MLAS (edge_server.verifier);
    # the in-process tests cover the several-thread products
    srv = ServerProcess(["--log-level", "WARNING", "--max-tree-nodes", "64", "--max-new-tokens", "512",
                         "--max-sessions", "16", "--fixed-budget", "--threads", "1", "--metrics-port", "0",
                         # e.g. "--device cuda --dtype float32" (scripts/gpu_check.sh)
                         *shlex.split(os.environ.get("EDGESPEC_TEST_SERVER_ARGS", ""))])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    """A connected stub, the server info, and the device tokenizer pulled from the server."""
    import grpc

    from device_client.cli import load_tokenizer
    from shared.protocol import pb, rpc

    channel = grpc.insecure_channel(server.address)
    stub = rpc.EdgeSpecStub(channel)
    info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
    yield stub, info, load_tokenizer(stub, info)
    channel.close()
