"""device-client as a person runs it: a flag value the server would refuse, or that cannot
work, is refused here first; Ctrl-C stops an answer without a traceback or a leftover session."""
import json
import signal
import subprocess
import sys

import pytest

from device_client.cli import WaitingNotice, parse_args
from shared.protocol import pb

from conftest import PROMPTS, ROOT, wait_for


@pytest.mark.parametrize("flag, value, says", [
    ("--tree-budget", "0", "--tree-budget must be at least 1"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0"),
    ("--top-p", "2", "--top-p must be in [0, 1]"),
    ("--top-k", "-3", "--top-k must be >= 0"), ("--timeout", "0", "--timeout must be a number of seconds above 0"),
    ("--timeout", "nan", "--timeout must be a number of seconds above 0"),
    ("--reconnect-s", "-1", "--reconnect-s must be a number of seconds >= 0"),
    ("--reconnect-s", "nan", "--reconnect-s must be a number of seconds >= 0"),
    ("--busy-wait-s", "-1", "--busy-wait-s must be a number of seconds >= 0"),
    ("--server", "edge.local", "--server needs the port: edge.local:50051"),
    ("--tls-cert", "device.pem", "--tls-cert and --tls-key go together"),
    ("--server", "http://edge.local:50051/", "--server takes HOST:PORT, not a URL (gRPC): try edge.local:50051"),
])
def test_a_flag_out_of_range_is_refused_with_what_it_must_be(flag, value, says, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--server", "127.0.0.1:50051", flag, value, "hello"])
    assert says in capsys.readouterr().err


def test_a_seed_is_drawn_unless_given(capsys):
    """Sampling twice without --seed gives two answers (the seed is reported to reproduce one)."""
    seeds = {parse_args(["--temperature", "0.8", "hello"]).seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert parse_args(["--seed", "7", "hello"]).seed == 7
    with pytest.raises(SystemExit):
        parse_args(["--seed", "-1", "hello"])
    assert "--seed must be in 0..2^64-1" in capsys.readouterr().err


def test_the_defaults_parse():
    args = parse_args(["hello"])
    assert args.timeout > 0 and args.tree_budget >= 1 and args.prompt == "hello"


def test_a_full_servers_line_is_reported_on_joining_and_when_next(capsys):
    notice = WaitingNotice()
    for ahead in (3, 2, 1, 0, 1, 0):  # a resumption went ahead once
        notice(ahead)
    assert capsys.readouterr().err.splitlines() == [
        "device-client: the server is full; waiting for room (3 ahead)",
        "device-client: the server is full; waiting for room (next in line)"]


def test_a_prompt_is_needed_unless_chatting(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "give the prompt, or --chat" in capsys.readouterr().err
    assert parse_args(["--chat"]).prompt is None
    with pytest.raises(SystemExit):
        parse_args(["--chat", "--raw", "hello"])
    assert "leave out --raw" in capsys.readouterr().err


def _cache_entries(stub) -> int:
    return json.loads(stub.GetMetrics(pb.MetricsRequest(), timeout=10).json)["prompt_cache_entries"]


def test_ctrl_c_stops_the_answer_cleanly_and_the_server_frees_the_session(client, server):
    """The client cancels: the server frees the session and keeps nothing for a resumption."""
    stub, _, _ = client
    entries = _cache_entries(stub)
    proc = subprocess.Popen([sys.executable, "-m", "device_client.cli", "--server", server.address, "--ignore-eos",
                             "--max-new-tokens", "512", "--drafter", "none", PROMPTS[0]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.read(1)  # the answer has begun
        assert stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10).active_sessions == 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "device-client: stopped" in err and "Traceback" not in err
    assert wait_for(lambda: stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10).active_sessions == 0)
    assert _cache_entries(stub) == entries  # a broken stream's session would have been kept
