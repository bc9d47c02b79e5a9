"""Several edge servers with the same model (device-client --server A,B): an answer whose server
goes away mid-way resumes on the next one, to the tokens it would have given unbroken; a first
server that does not answer is passed over."""
import json
import socket
import subprocess
import sys
import threading

import grpc
import pytest

from device_client.cli import EdgeServers, parse_args
from device_client.drafters.none import NoDrafter
from device_client.session import Request, generate
from edge_server.launcher import ServerProcess
from shared.protocol import pb, rpc

from conftest import PROMPTS, ROOT


@pytest.fixture(scope="module")
def standby():
    with ServerProcess(["--log-level", "WARNING", "--threads", "1"]) as srv:
        yield srv


def test_an_answer_whose_server_stops_resumes_on_the_next_one(standby, capsys):
    ids = [1, 9690, 198, 2683]
    request = Request(ids, max_new_tokens=160, ignore_eos=True, mode="server-ar")
    with grpc.insecure_channel(standby.address) as other:
        other_stub = rpc.EdgeSpecStub(other)
        fingerprint = other_stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30).tokenizer_fingerprint
        unbroken = generate(other_stub, request, NoDrafter(), fingerprint, timeout=120).token_ids
    first = ServerProcess(["--log-level", "WARNING", "--threads", "1"])
    servers = EdgeServers(parse_args(["--server", f"{first.address},{standby.address}", "-"]))
    try:
        stub, _ = servers.connect()
        flowing, done = threading.Event(), []
        thread = threading.Thread(target=lambda: done.append(generate(
            stub, request, NoDrafter(), fingerprint, on_tokens=lambda _: flowing.set(),
            timeout=120, reconnect_s=30, failover=servers.failover)))
        thread.start()
        assert flowing.wait(60)
        first.stop()  # mid-answer
        thread.join(120)
    finally:
        first.stop()
        servers.close()
    assert servers.at == 1 and f"resuming the answer on {standby.address}" in capsys.readouterr().err
    assert done and done[0].reconnects >= 1 and done[0].token_ids == unbroken


def test_device_client_passes_over_a_server_that_does_not_answer(standby):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nobody = "127.0.0.1:%d" % s.getsockname()[1]
    with grpc.insecure_channel(standby.address) as channel:
        stub = rpc.EdgeSpecStub(channel)
        fingerprint = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30).tokenizer_fingerprint
        out = subprocess.run([sys.executable, "-m", "device_client.cli", "--server", f"{nobody},{standby.address}",
                              "--drafter", "ngram", "--max-new-tokens", "16", "--json", PROMPTS[0]],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout.splitlines()[-1])
        again = generate(stub, Request(summary["prompt_token_ids"], max_new_tokens=16, mode="server-ar"),
                         NoDrafter(), fingerprint, timeout=60)
    assert summary["token_ids"] == again.token_ids
