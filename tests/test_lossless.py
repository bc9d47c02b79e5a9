"""The contract: device-edge speculation yields exactly the target's own greedy output, and a
seeded sample exactly the target's own sample with that seed (edge_server.sampling)."""
import json
import os
import subprocess
import sys

import grpc
import pytest

from device_client.cli import make_drafter
from device_client.drafters.ngram import NgramDrafter
from device_client.drafters.none import NoDrafter
from device_client.session import Request, generate
from shared.protocol import pb, rpc

from conftest import PROMPTS, ROOT, Served

MAX_NEW = 40


def greedy_references(served, tokenizer, prompts: list[str]) -> dict[str, tuple[list[int], list[int]]]:
    """The target's own greedy continuation (conftest.Served) of the same prompt ids."""
    refs = {}
    for prompt in prompts:
        ids = tokenizer.chat_ids(prompt)
        refs[prompt] = (ids, served.greedy(ids, MAX_NEW))
    return refs


@pytest.fixture(scope="module")
def references(served, client):
    return greedy_references(served, client[2], PROMPTS[:8])


DRAFTERS = {
    "none": lambda stub, info: NoDrafter(),
    "ngram": lambda stub, info: NgramDrafter(),
    "heads-dynamic+ngram": lambda stub, info: make_drafter("heads", stub, info, "dynamic", True),
    "heads-static": lambda stub, info: make_drafter("heads", stub, info, "static", False),
    "heads-unified+ngram": lambda stub, info: make_drafter("heads", stub, info, "unified", True),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_equals_target_generate(client, references, name):
    stub, info, _ = client
    drafter = DRAFTERS[name](stub, info)
    accepted = 0
    for prompt, (ids, expected) in references.items():
        rec = generate(stub, Request(ids, max_new_tokens=MAX_NEW, tree_budget=32), drafter,
                       info.tokenizer_fingerprint, timeout=120)
        assert rec.token_ids == expected, prompt
        assert sum(rec.accepted_per_round) + 1 == len(rec.token_ids)
        accepted += len(rec.token_ids) - 1 - rec.rounds
    assert (accepted > 0) == (name != "none")  # real trees were verified, and some held


def test_lock_step_at_budget_one_decodes_alone(client, references):
    """A device that caps its trees at 1 node: the server decodes every round alone, the device
    sends no Draft and gets no hidden states, and the text is the same."""
    stub, info, _ = client
    drafter = DRAFTERS["heads-unified+ngram"](stub, info)
    prompt, (ids, expected) = next(iter(references.items()))
    rec = generate(stub, Request(ids, max_new_tokens=MAX_NEW, tree_budget=1), drafter,
                   info.tokenizer_fingerprint, timeout=120)
    assert rec.token_ids == expected
    assert rec.tree_sizes == [] and rec.rounds == len(expected) - 1
    assert rec.bytes_down < 40 * len(expected)  # no 1.1 KB hidden state per verdict


@pytest.mark.parametrize("name", ["ngram", "heads-dynamic+ngram", "heads-unified+ngram"])
def test_pipelined_greedy_equals_target_generate(client, references, name):
    """The server decodes without waiting for drafts and verifies each one re-rooted."""
    stub, info, _ = client
    drafter = DRAFTERS[name](stub, info)
    for prompt, (ids, expected) in list(references.items())[:4]:
        rec = generate(stub, Request(ids, max_new_tokens=MAX_NEW, tree_budget=32, mode="pipelined"), drafter,
                       info.tokenizer_fingerprint, timeout=120)
        assert rec.token_ids == expected, prompt
        assert sum(rec.accepted_per_round) + 1 == len(rec.token_ids)


def test_server_ar_mode_equals_target_generate(client, references):
    stub, info, _ = client
    prompt = PROMPTS[0]
    ids, expected = references[prompt]
    rec = generate(stub, Request(ids, max_new_tokens=MAX_NEW, mode="server-ar"), NoDrafter(),
                   info.tokenizer_fingerprint, timeout=120)
    assert rec.token_ids == expected


def test_a_seeded_sample_is_the_server_decoding_alone_whatever_drafts_it(client, references):
    """At temperature > 0 a draw depends on the seed and the position only, so every drafter
    and mode gives server-only decoding's tokens for the same seed, and trees were accepted."""
    stub, info, _ = client
    drafters = {name: DRAFTERS[name](stub, info) for name in ("ngram", "heads-unified+ngram")}
    for prompt, (ids, greedy) in list(references.items())[:3]:
        def sample(drafter, mode="speculative", seed=11):
            return generate(stub, Request(ids, max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, seed=seed,
                                          tree_budget=16, mode=mode), drafter,
                            info.tokenizer_fingerprint, timeout=120)
        alone = sample(NoDrafter(), "server-ar").token_ids
        assert alone != greedy and sample(NoDrafter(), "server-ar", seed=12).token_ids != alone
        for name, drafter in drafters.items():
            for mode in ("speculative", "pipelined"):
                rec = sample(drafter, mode)
                assert rec.token_ids == alone, (prompt, name, mode)
                if mode == "speculative" and name.startswith("heads"):
                    assert len(rec.token_ids) - 1 > rec.rounds  # some drafted tokens were accepted


def test_cli_json_reports_every_field(server, references):
    prompt = PROMPTS[2]
    env = {**os.environ}
    out = subprocess.run(
        [sys.executable, "-m", "device_client.cli", "--server", server.address, "--json",
         "--max-new-tokens", str(MAX_NEW), "--drafter", "ngram", prompt],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("text", "prompt_token_ids", "token_ids", "finish_reason", "drafter", "rounds", "seed",
                "mean_accepted", "accepted_per_round", "ttft_ms", "total_ms", "tokens_per_s",
                "itl_ms_p50", "itl_ms_p95", "bytes_up", "bytes_down"):
        assert key in record, key
    ids, expected = references[prompt]
    assert record["prompt_token_ids"] == ids
    assert record["token_ids"] == expected
    assert record["text"] and record["text"] in out.stdout
    assert record["bytes_up"] > 0 and record["bytes_down"] > 0
    assert "tokens in" in out.stderr  # the one-line summary


@pytest.fixture(scope="module")
def fp32_client(client):
    """A second server pinned to fp32, when the default one runs another dtype."""
    if client[1].dtype == "float32":
        pytest.skip("the default test server already runs fp32")
    from edge_server.launcher import ServerProcess

    with ServerProcess(["--log-level", "WARNING", "--max-tree-nodes", "64", "--dtype", "float32",
                        "--fixed-budget"]) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = rpc.EdgeSpecStub(channel)
            yield stub, stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)


@pytest.mark.parametrize("mode", ["speculative", "pipelined"])
def test_fp32_server_greedy_equals_fp32_generate(fp32_client, loaded, client, mode):
    """Every dtype setting keeps the contract: the fp32 server against fp32 generate()."""
    stub, info = fp32_client
    drafter = make_drafter("heads", stub, info, "unified", True)
    refs = greedy_references(Served(loaded, "float32", info.device), client[2], PROMPTS[:3])
    for prompt, (ids, expected) in refs.items():
        rec = generate(stub, Request(ids, max_new_tokens=MAX_NEW, tree_budget=32, mode=mode), drafter,
                       info.tokenizer_fingerprint, timeout=120)
        assert rec.token_ids == expected, prompt
