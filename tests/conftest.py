"""Fixtures: the real embedded model, and a real edge-server process on 127.0.0.1."""
from __future__ import annotations

import os
import shlex
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


@pytest.fixture(scope="session")
def loaded():
    import torch

    from edge_server.model_store import load_model

    torch.manual_seed(0)
    return load_model("default", torch.float32, "cpu")


@pytest.fixture(scope="session")
def server():
    from edge_server.launcher import ServerProcess

    srv = ServerProcess(["--log-level", "WARNING", "--max-tree-nodes", "64", "--max-new-tokens", "512",
                         "--max-sessions", "16",
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
