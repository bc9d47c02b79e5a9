"""edge-server's own flags that no end-to-end test exercises."""
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from device_client.drafters.none import NoDrafter
from device_client.session import Request, generate
from edge_server.cli import parse_args, parse_cpus, pin_process
from edge_server.launcher import ServerProcess
from shared.protocol import pb, rpc

from conftest import ROOT, wait_for


def test_cpus_pins_threads_started_before_the_flags_were_read():
    """torch starts a thread at import; `--cpus` must pin it too, not only the threads after."""
    before = os.sched_getaffinity(0)
    ready, done, tids = threading.Event(), threading.Event(), []

    def early():
        tids.append(threading.get_native_id())
        ready.set()
        done.wait()

    thread = threading.Thread(target=early)
    thread.start()
    ready.wait()
    try:
        pin_process({min(before)})
        assert os.sched_getaffinity(tids[0]) == {min(before)}
    finally:
        done.set()
        thread.join()
        pin_process(before)


def test_cpus_says_what_is_wrong_with_a_bad_list():
    assert parse_cpus("0") == {0}
    with pytest.raises(SystemExit, match="expected core numbers and ranges"):
        parse_cpus("zero")
    with pytest.raises(SystemExit, match="this machine has cores"):
        parse_cpus(f"{os.cpu_count()}")


def test_a_kv_budget_too_small_for_any_session_stops_the_server_with_a_message():
    """The warm-up needs a slot; a budget that cannot hold one says so at start, not in a traceback."""
    proc = _serve("--port", "0", "--kv-budget-mb", "0.0001")
    assert proc.returncode != 0
    assert "--kv-budget-mb 0.0001 holds 0 KV positions" in proc.stderr and "give it more" in proc.stderr
    assert "Traceback" not in proc.stderr


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_server.cli", *flags], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_a_taken_port_stops_the_server_with_a_message():
    """gRPC's default would bind a port another gRPC server holds (SO_REUSEPORT) and the two
    would split the devices' connections; edge-server refuses it before loading the model."""
    holder = grpc.server(ThreadPoolExecutor(1))
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        proc = _serve("--port", str(port))
    finally:
        holder.stop(0)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} (in use?); pick another --port" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("model, says", [("/no/such/model", "there is no folder /no/such/model."),
                                         ("NO_WEIGHTS", "no file named")])
def test_a_model_that_cannot_be_loaded_stops_the_server_with_a_message(model, says, tmp_path):
    if model == "NO_WEIGHTS":  # a config, nothing else
        (tmp_path / "config.json").write_text('{"model_type": "llama"}')
        model = str(tmp_path)
    proc = _serve("--port", "0", "--model", model)
    assert proc.returncode != 0
    assert f"cannot load --model {model!r}: " in proc.stderr and says in proc.stderr
    assert "Give a folder holding a HuggingFace causal LM" in proc.stderr and "Traceback" not in proc.stderr


def test_shutdown_ends_every_stream_with_unavailable_and_why():
    """SIGTERM: a device mid-answer is told to resume elsewhere or later (and its client would
    resume by itself); the server exits 0 without gRPC's cancellation tracebacks."""
    srv = ServerProcess(["--log-level", "INFO", "--threads", "1"])
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = rpc.EdgeSpecStub(channel)
            info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
            flowing, failed = threading.Event(), []

            def device():
                try:
                    generate(stub, Request([1, 9690, 198, 2683], max_new_tokens=2000, ignore_eos=True,
                                           mode="server-ar"), NoDrafter(), info.tokenizer_fingerprint,
                             on_tokens=lambda _: flowing.set(), timeout=120)
                except grpc.RpcError as err:
                    failed.append(err)
            thread = threading.Thread(target=device)
            thread.start()
            assert flowing.wait(60)
            srv.stop()
            thread.join(30)
    finally:
        srv.stop()
    assert failed and failed[0].code() == grpc.StatusCode.UNAVAILABLE
    assert "the edge server is shutting down; resume the generation" in failed[0].details()
    log = "".join(srv.log)
    assert srv.proc.returncode == 0 and "Traceback" not in log, log
    # the operator's line for the session, which ended unfinished
    assert re.search(r"session \w+ from ipv4:127\.0\.0\.1:\d+: server-ar, prompt 4 tokens \(0 from the cache\), "
                     r"\d+ tokens in \d+ rounds after the first, finish NONE", log), log


def test_a_stopping_server_lets_the_running_answer_finish_and_turns_new_streams_away():
    """SIGTERM with --drain-s: the answer under way runs to its end, exact, while a new stream is
    told to go elsewhere; the server exits once the answer is done, long before the drain ends."""
    srv = ServerProcess(["--log-level", "INFO", "--threads", "1", "--drain-s", "120"])
    done = []
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = rpc.EdgeSpecStub(channel)
            fingerprint = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30).tokenizer_fingerprint
            request = Request([1, 9690, 198, 2683], max_new_tokens=240, ignore_eos=True, mode="server-ar")
            reference = generate(stub, request, NoDrafter(), fingerprint, timeout=120).token_ids
            flowing = threading.Event()
            thread = threading.Thread(target=lambda: done.append(generate(
                stub, request, NoDrafter(), fingerprint, on_tokens=lambda _: flowing.set(), timeout=120)))
            thread.start()
            assert flowing.wait(60)
            srv.proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: "stopping: 1 answers may finish within 120 s" in "".join(srv.log))
            with pytest.raises(grpc.RpcError) as turned_away:
                generate(stub, Request([1, 2, 3], max_new_tokens=4), NoDrafter(), fingerprint, timeout=30)
            thread.join(60)
            srv.proc.wait(60)
    finally:
        srv.stop()
    assert done and done[0].token_ids == reference
    assert turned_away.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "start the generation on another server" in turned_away.value.details()
    assert srv.proc.returncode == 0 and "Traceback" not in "".join(srv.log)


def test_the_metrics_endpoint_may_listen_apart_from_the_devices():
    import urllib.request

    with ServerProcess(["--log-level", "WARNING", "--threads", "1", "--metrics-port", "0",
                        "--metrics-host", "127.0.0.2"]) as srv:
        url = next(m.group(1) for line in srv.log if (m := re.search(r"metrics on (http://\S+)", line)))
        assert srv.address.startswith("127.0.0.1:") and url.startswith("http://127.0.0.2:")
        assert "edgespec_kv_budget_tokens" in urllib.request.urlopen(url, timeout=10).read().decode()


@pytest.mark.parametrize("flag, value, says", [
    ("--max-batch-size", "0", "0 must be at least 1"), ("--max-batch-tokens", "0", "0 must be at least 1"),
    ("--prefill-chunk", "0", "0 must be at least 1"), ("--max-tree-nodes", "0", "0 must be at least 1"),
    ("--max-sessions", "0", "0 must be at least 1"), ("--threads", "-1", "-1 must be at least 0"),
    ("--kv-budget-mb", "0", "0 must be above 0"), ("--idle-timeout", "-5", "-5 must be above 0"),
    ("--batch-window-ms", "-1", "-1 must be at least 0"), ("--max-new-tokens", "two", "'two' is not an integer"),
    ("--kv-budget-mb", "nan", "'nan' is not a number"), ("--idle-timeout", "inf", "'inf' is not a number"),
])
def test_a_flag_out_of_range_is_refused_at_the_command_line(flag, value, says, capsys):
    """A zero batch or prefill chunk would never run a step; argparse says what to change."""
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert f"argument {flag}: {says}" in capsys.readouterr().err


def test_the_flags_defaults_and_their_zeros_that_mean_something_still_parse():
    args = parse_args(["--threads", "0", "--max-context", "0", "--batch-window-ms", "0", "--kv-budget-mb", "0.5"])
    assert (args.threads, args.max_context, args.batch_window_ms, args.kv_budget_mb) == (0, 0, 0.0, 0.5)
    assert parse_args([]).max_batch_size == 32
