"""Continuous batching: exactness across concurrent sessions, KV freed, backpressure."""
import dataclasses
import os
import shlex
import threading
import time

import grpc
import pytest
import torch

from device_client.cli import make_drafter
from device_client.drafters.ngram import NgramDrafter
from device_client.drafters.none import NoDrafter
from device_client.session import Request, busy_retry_after_s, generate
from edge_server.kv_cache import KVPool
from edge_server.launcher import ServerProcess
from edge_server.sampling import Sampling
from edge_server.session import Session
from edge_server.verifier import TargetModel
from shared.protocol import RETRY_AFTER_MS, pb, rpc
from shared.tree import TokenTree

from conftest import PROMPTS, Served, Stream, prometheus_samples, wait_for

MAX_NEW = 24


def _greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_batched_and_unbatched_accept_same_paths(loaded):
    """The same trees through one ragged batch (slots) and one by one (DynamicCache)."""
    target = TargetModel(loaded.model, max_context=8192)
    pool = KVPool.for_model(loaded.model, 64)
    tok = loaded.tokenizer
    prompts = [tok(p).input_ids for p in ("The capital of France is", "def add(a, b):\n    return",
                                          "1, 2, 3, 4,", "Once upon a time")]
    refs = [_greedy(loaded.model, p, 12) for p in prompts]
    solo = [Session(p, Sampling(), 64, frozenset(), want_hidden=True) for p in prompts]
    batched = [Session(p, Sampling(), 64, frozenset(), want_hidden=True) for p in prompts]
    for s in batched:
        s.slot = pool.allocate(len(s.prompt_ids) + 64 + 16)
    first = [s.prefill(target) for s in solo]
    # batched prefill in chunks of 3 tokens, all sessions in the same steps
    done = [None] * len(batched)
    while any(d is None for d in done):
        todo = [i for i, d in enumerate(done) if d is None]
        rows = [batched[i].prefill_row(3) for i in todo]
        logits, hidden = target.forward_rows(rows)
        for i, row, lg, hd in zip(todo, rows, logits, hidden):
            done[i] = batched[i].after_prefill_row(row, lg, hd, target.max_context, 0.0)
    assert [r.tokens for r in first] == [d.tokens for d in done]

    def tree(kind, s, ref):
        """A fixed set: the greedy path with wrong siblings, a wrong chain, root only, a deep chain."""
        good = ref[len(s.generated):] + [0] * 8
        if kind == 0:
            return TokenTree((s.bonus, 17, good[0], good[1], 99, good[2]), (-1, 0, 0, 2, 3, 3))
        if kind == 1:
            return TokenTree((s.bonus, 5, 6, 7), (-1, 0, 1, 2))
        if kind == 2:
            return TokenTree.root_only(s.bonus)
        return TokenTree((s.bonus, *good[:4]), (-1, 0, 1, 2, 3))

    for kind in range(4):
        round_trees = [tree(kind, s, r) for s, r in zip(solo, refs)]
        a = [s.verify(target, t) for s, t in zip(solo, round_trees)]
        rows = [s.tree_row(t) for s, t in zip(batched, round_trees)]
        logits, hidden = target.forward_rows(rows)
        b = [s.after_tree_row(t, lg, hd, target.max_context, 0.0)
             for s, t, lg, hd in zip(batched, round_trees, logits, hidden)]
        for x, y in zip(a, b):
            assert x.tokens == y.tokens and x.accepted == y.accepted
            assert torch.allclose(x.hidden, y.hidden, atol=1e-4)
        if kind in (0, 3):
            assert all(x.accepted >= 2 for x in a)
    for s, r in zip(batched, refs):
        assert s.generated == r[:len(s.generated)]
        pool.free(s.slot)


def _generate_all(stub, info, jobs: list) -> list:
    """Runs (Request, drafter) jobs as concurrent device sessions; their records, in order."""
    results, errors = [None] * len(jobs), []

    def run(i, request, drafter):
        try:
            results[i] = generate(stub, request, drafter, info.tokenizer_fingerprint, timeout=300)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_eight_concurrent_sessions_each_equal_their_greedy_reference(client, served):
    stub, info, tokenizer = client
    ids = [tokenizer.chat_ids(prompt) for prompt in PROMPTS[:8]]
    jobs = [(Request(x, max_new_tokens=MAX_NEW, tree_budget=16), NgramDrafter() if i % 2 else NoDrafter())
            for i, x in enumerate(ids)]
    for x, rec in zip(ids, _generate_all(stub, info, jobs)):
        assert rec.token_ids == served.greedy(x, MAX_NEW)
    sizes = [s["batch_size"]["max"] for s in [_metrics(stub).get("window", {})] if s]
    assert sizes and sizes[0] >= 2  # the sessions really shared forwards


def test_sampled_and_greedy_sessions_in_the_same_steps_each_get_their_own_tokens(client, served):
    """Eight concurrent sessions, sampled and greedy, drafting and not, in one batch: each one's
    tokens are those its request gives decoding alone (a seeded draw depends on its position
    only), with the greedy rows' argmax and the sampled rows' logits taken from the same steps."""
    stub, info, tokenizer = client
    heads = make_drafter("heads", stub, info)
    ids = [tokenizer.chat_ids(prompt) for prompt in PROMPTS[:8]]
    requests = [Request(x, max_new_tokens=MAX_NEW, tree_budget=16, temperature=0.0 if i % 4 == 3 else 0.8,
                        top_p=0.9 if i % 2 else 1.0, top_k=40 if i % 3 == 0 else 0, seed=100 + i)
                for i, x in enumerate(ids)]
    drafters = [heads if i % 2 else NgramDrafter() for i in range(8)]
    together = _generate_all(stub, info, list(zip(requests, drafters)))
    for request, rec in zip(requests, together):
        alone = generate(stub, dataclasses.replace(request, mode="server-ar"), NoDrafter(),
                         info.tokenizer_fingerprint, timeout=300)
        assert rec.token_ids == alone.token_ids
        if request.temperature == 0:
            assert rec.token_ids == served.greedy(request.prompt_ids, MAX_NEW)
    assert sum(len(r.token_ids) - 1 - r.rounds for r in together) > 0  # drafts were accepted


def test_adaptive_budgets_are_lossless_and_learn_node_acceptance(loaded, client):
    """Under the load-aware controller the budgets change with the load (sessions arrive one by
    one) and its probes; every session still equals its greedy reference, and the verified
    rounds taught the server what a tree of each budget yields (GetMetrics)."""
    srv = ServerProcess(["--log-level", "WARNING", "--max-tree-nodes", "16",
                         *shlex.split(os.environ.get("EDGESPEC_TEST_SERVER_ARGS", ""))])
    with srv, grpc.insecure_channel(srv.address) as channel:
        stub = rpc.EdgeSpecStub(channel)
        info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30)
        served = Served(loaded, info.dtype, info.device)
        ids = [client[2].chat_ids(prompt) for prompt in PROMPTS[:4]]
        jobs = [(Request(x, max_new_tokens=48, tree_budget=16, mode="pipelined" if i == 3 else "speculative"),
                 make_drafter("heads", stub, info, "unified", True) if i % 2 else NgramDrafter())
                for i, x in enumerate(ids)]
        for x, rec in zip(ids, _generate_all(stub, info, jobs)):
            assert rec.token_ids == served.greedy(x, 48)
        budget = _metrics(stub)["budget"]
        assert budget["adaptive"]
        assert budget["tokens_per_round"]["1"] == 1.0  # decoding alone: the bonus token
        assert budget["tokens_per_round"]["2"] > 1.0  # some verified rounds accepted their first node
        prometheus = stub.GetMetrics(pb.MetricsRequest(), timeout=10).prometheus
        assert 'edgespec_tokens_per_round{budget="2"}' in prometheus
        prices = budget["node_prices"]  # none until a probe has measured what a token costs
        assert all(0.0 <= p <= 1.0 for p in prices) and "# TYPE edgespec_node_price gauge" in prometheus
        assert all(f'edgespec_node_price{{tree_size="{2 << k}"}}' in prometheus for k in range(len(prices)))


def test_prometheus_scrape_counts_what_the_server_did(server, client):
    """--metrics-port serves counters, histograms and gauges over HTTP for a Prometheus server;
    they agree with GetMetrics, and its counters only grow: a GetMetrics reset restarts the
    JSON's window and counters alone."""
    import json
    import re
    import urllib.request

    url = next(m.group(1) for line in server.log if (m := re.search(r"metrics on (http://\S+)", line)))
    stub, info, tok = client
    rec = generate(stub, Request(tok.chat_ids(PROMPTS[0]), max_new_tokens=8), NoDrafter(), info.tokenizer_fingerprint)
    before = prometheus_samples(urllib.request.urlopen(url, timeout=10).read().decode())
    reply = stub.GetMetrics(pb.MetricsRequest(reset=True), timeout=10)
    counters = json.loads(reply.json)["counters"]  # since the server started: nothing reset them before
    assert before["edgespec_generated_tokens_total"] == counters["generated_tokens"] >= len(rec.token_ids)
    assert before["edgespec_steps_total"] == before["edgespec_step_seconds_count"] == counters["steps"]
    assert before["edgespec_step_tokens_sum"] == counters["batch_tokens"]
    assert prometheus_samples(reply.prometheus)["edgespec_generated_tokens_total"] == counters["generated_tokens"]
    after = prometheus_samples(urllib.request.urlopen(url, timeout=10).read().decode())
    assert after["edgespec_generated_tokens_total"] == before["edgespec_generated_tokens_total"]
    assert json.loads(stub.GetMetrics(pb.MetricsRequest(), timeout=10).json)["counters"]["generated_tokens"] == 0
    assert after["edgespec_kv_budget_tokens"] > 0 and after["edgespec_tree_budget"] == info.max_tree_nodes


def _metrics(stub):
    import json
    return json.loads(stub.GetMetrics(pb.MetricsRequest(), timeout=10).json)


def _start(info, max_new=8, prompt=(1, 9690, 198)):
    return pb.ClientMessage(start=pb.Start(prompt_token_ids=list(prompt), max_new_tokens=max_new,
                                           tokenizer_fingerprint=info.tokenizer_fingerprint))


def test_cancel_and_disconnect_free_the_kv(client):
    stub, info, _ = client
    assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0)
    s = Stream(stub, _start(info, max_new=100))
    next(s.replies)
    m = stub.GetMetrics(pb.MetricsRequest(), timeout=10)
    assert m.active_sessions == 1 and m.kv_used_tokens > 0
    s.send(pb.ClientMessage(cancel=pb.Cancel()))
    assert list(s.replies) == []
    s.close()
    assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0)
    assert stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10).active_sessions == 0

    d = Stream(stub, _start(info, max_new=100))
    received = list(next(d.replies).started.first.tokens)
    d.replies.cancel()  # the device goes away without a Cancel
    d.close()
    assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0)
    assert stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10).active_sessions == 0
    # it may come back: its prompt stayed in the prompt cache (given back whenever a session
    # needs the room), and resuming it copies the prompt's positions, its partial chunk too
    again = _start(info, max_new=100)
    again.start.resume_token_ids.extend(received)
    r = Stream(stub, again)
    assert next(r.replies).started.cached_prompt_tokens == len(again.start.prompt_token_ids)
    r.send(pb.ClientMessage(cancel=pb.Cancel()))
    assert list(r.replies) == []
    r.close()
    assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0)


LINE_WAIT_S = 2


@pytest.fixture(scope="module")
def small_server():
    # 46,080 B per KV position in fp32: 12 MiB hold ~270 positions
    srv = ServerProcess(["--log-level", "WARNING", "--max-sessions", "2", "--max-tree-nodes", "16",
                         "--kv-budget-mb", "12", "--idle-timeout", "6", "--dtype", "float32",
                         "--max-waiting", "1", "--admission-wait-s", str(LINE_WAIT_S),
                         "--fixed-budget"])  # lock-step sessions wait for Drafts (the idle timeout)
    channel = grpc.insecure_channel(srv.address)
    stub = rpc.EdgeSpecStub(channel)
    yield stub, stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30), srv.address
    channel.close()
    srv.stop()


def _refused(stub, first):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(iter([first]), timeout=60))
    return err.value


def _retry_after_ms(err) -> int | None:
    hint = dict(err.trailing_metadata() or ()).get(RETRY_AFTER_MS)
    return None if hint is None else int(hint)


def _hold(stub, info, n, max_new):
    """n lock-step sessions the server keeps waiting for Drafts (until the idle timeout)."""
    held = [Stream(stub, _start(info, max_new=max_new)) for _ in range(n)]
    for h in held:
        next(h.replies)
    return held


def _let_go(held):
    for h in held:
        h.send(pb.ClientMessage(cancel=pb.Cancel()))
        list(h.replies)
        h.close()


def _admission_waits(stub) -> dict[str, float]:
    """The admission wait histogram's samples: 'count', 'sum', 'bucket{le=0.5}', ..."""
    prefix = "edgespec_admission_wait_seconds_"
    samples = prometheus_samples(stub.GetMetrics(pb.MetricsRequest(), timeout=10).prometheus)
    return {name[len(prefix):]: value for name, value in samples.items() if name.startswith(prefix)}


def _waiting(stub) -> int:
    return _metrics(stub)["waiting_sessions"]


def test_backpressure_is_resource_exhausted_and_the_server_recovers(small_server):
    stub, info, _ = small_server
    held = _hold(stub, info, 2, max_new=20)
    in_line = []
    waiter = threading.Thread(target=lambda: in_line.append(_refused(stub, _start(info))))
    waiter.start()  # waits in line for a slot, LINE_WAIT_S at most
    assert wait_for(lambda: _waiting(stub) == 1)
    err = _refused(stub, _start(info))  # the line (one stream) is full: refused at once
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 streams are waiting for room ahead of this one" in err.details() and "retry in" in err.details()
    assert 200 <= _retry_after_ms(err) <= 10_000  # the hint a client acts on
    waiter.join()
    err = in_line[0]
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"server is full (2 sessions); waited {LINE_WAIT_S} s in line" in err.details()
    assert 200 <= _retry_after_ms(err) <= 10_000
    _let_go(held)
    held = _hold(stub, info, 1, max_new=150)  # 169 of the ~270 positions
    err = _refused(stub, _start(info, max_new=150))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV budget exhausted" in err.details() and "retry in" in err.details()
    assert 200 <= _retry_after_ms(err) <= 10_000
    _let_go(held)
    err = _refused(stub, _start(info, max_new=400))  # more KV than the whole budget: waiting will not help
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "never fit" in err.details() and "lower max_new_tokens to at most" in err.details()
    assert _retry_after_ms(err) is None
    assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0)
    assert _waiting(stub) == 0
    rec = generate(stub, Request([1, 9690, 198, 2683], max_new_tokens=4), NoDrafter(),
                   info.tokenizer_fingerprint, timeout=60)
    assert len(rec.token_ids) == 4


@pytest.mark.parametrize("room", ["a session slot", "KV"])
def test_a_stream_waits_in_line_for_room_and_gets_its_answer(small_server, loaded, room):
    """The server holds the Start until a session ends, instead of refusing it: no retry."""
    stub, info, _ = small_server
    held = _hold(stub, info, 2, max_new=20) if room == "a session slot" else _hold(stub, info, 1, max_new=150)
    ids = [1, 9690, 198, 2683]
    threading.Timer(LINE_WAIT_S / 2, _let_go, [held]).start()
    n = 8 if room == "a session slot" else 150  # KV: needs more room than is free beside the held session
    places = []
    rec = generate(stub, Request(ids, max_new_tokens=n, mode="server-ar"), NoDrafter(),
                   info.tokenizer_fingerprint, timeout=60, on_waiting=places.append)
    assert rec.busy_refusals == 0 and rec.ttft_ms >= LINE_WAIT_S / 2 * 1e3 - 100
    assert places == [0] and LINE_WAIT_S / 2 * 1e3 - 100 <= rec.line_wait_ms <= rec.ttft_ms  # told it was next
    assert rec.token_ids == _greedy(loaded.model, ids, n)
    waits = _admission_waits(stub)
    assert waits["bucket{le=0.5}"] < waits["count"]  # this stream waited longer


def test_a_prompt_that_would_pass_the_queued_prefill_bound_waits_in_line(loaded):
    """A long prompt is being fed in small chunks; a second prompt would pass
    --max-queued-prefill-tokens beside it, so it waits in line (not refused) until the first is
    in, then gets its exact answer."""
    first_ids, second_ids = [1] + list(range(200, 600)), [1] + list(range(700, 800))
    with ServerProcess(["--log-level", "WARNING", "--dtype", "float32", "--threads", "1",
                        "--max-queued-prefill-tokens", "64", "--prefill-chunk", "4"]) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = rpc.EdgeSpecStub(channel)
            fingerprint = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=30).tokenizer_fingerprint
            done = []
            feeding = threading.Thread(target=lambda: done.append(generate(
                stub, Request(first_ids, max_new_tokens=4, mode="server-ar"), NoDrafter(), fingerprint, timeout=120)))
            feeding.start()
            assert wait_for(lambda: _metrics(stub)["queued_prefill_tokens"] > 100)
            places = []
            rec = generate(stub, Request(second_ids, max_new_tokens=4, mode="server-ar"), NoDrafter(),
                           fingerprint, timeout=120, busy_wait_s=0, on_waiting=places.append)
            feeding.join(120)
    assert places == [0] and rec.busy_refusals == 0 and rec.line_wait_ms > 0
    assert rec.token_ids == _greedy(loaded.model, second_ids, 4)
    assert done[0].token_ids == _greedy(loaded.model, first_ids, 4)


def test_a_refused_device_waits_as_the_server_asks_and_gets_its_answer(small_server, loaded):
    stub, info, _ = small_server
    ids = [1, 9690, 198, 2683]
    request = Request(ids, max_new_tokens=8, mode="server-ar")
    held = _hold(stub, info, 2, max_new=20)
    with pytest.raises(grpc.RpcError) as err:  # the client does not wait: refused after the line's wait
        generate(stub, request, NoDrafter(), info.tokenizer_fingerprint, timeout=60, busy_wait_s=0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    threading.Timer(LINE_WAIT_S + 1, _let_go, [held]).start()  # room after one wait in line ran out
    rec = generate(stub, request, NoDrafter(), info.tokenizer_fingerprint, timeout=60, busy_wait_s=30)
    assert rec.busy_refusals >= 1 and rec.busy_wait_ms > 0
    assert rec.line_wait_ms >= LINE_WAIT_S * 1e3 - 100  # the wait in line that ended in the refusal
    assert rec.ttft_ms >= (LINE_WAIT_S + 1) * 1e3 - 100  # from the request, the waiting included
    assert rec.token_ids == _greedy(loaded.model, ids, 8)
    assert f"waited {rec.busy_wait_ms / 1e3:.1f} s for a busy server" in rec.summary_line()


def test_a_refusal_waiting_will_not_cure_is_not_retried(small_server):
    """gRPC's own RESOURCE_EXHAUSTED (a message over the size limit) carries no retry hint."""
    _, info, address = small_server
    with grpc.insecure_channel(address,
                               options=[("grpc.max_send_message_length", 64)]) as channel:
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            generate(rpc.EdgeSpecStub(channel), Request(list(range(1, 200)), max_new_tokens=4), NoDrafter(),
                     info.tokenizer_fingerprint, timeout=60, busy_wait_s=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert busy_retry_after_s(err.value) is None and time.perf_counter() - t0 < 10


def _tokens_until_finish(stream) -> list[int]:
    """The tokens of the verdicts after Started."""
    tokens = []
    for msg in stream.replies:
        tokens += msg.verdict.tokens
        if msg.verdict.finish_reason != pb.FINISH_NONE:
            return tokens
    raise AssertionError("the stream ended before the generation finished")


def test_a_resumption_ends_the_broken_session_the_server_still_runs(small_server, loaded):
    """A connection gone quiet leaves its session running (here a lock-step one waiting for its
    Draft) until keepalive pings notice. The device's resumption names it (resume_session_id):
    it ends at once, though the server is full, and the resumption copies its prompt and goes
    on with its tokens. One naming a session with another prompt is refused, and that session
    lives on."""
    stub, info, _ = small_server
    ids, n = [1, 9690, 198, 2683], 12
    quiet = Stream(stub, _start(info, max_new=n, prompt=ids))
    started = next(quiet.replies).started
    other = _hold(stub, info, 1, max_new=20)  # the server is full now

    def resumption(prompt):
        msg = _start(info, max_new=n, prompt=prompt)
        msg.start.mode = pb.MODE_SERVER_AR
        msg.start.resume_token_ids.extend(started.first.tokens)
        msg.start.resume_session_id = started.session_id
        return msg

    err = _refused(stub, resumption(ids[:-1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "another prompt or other tokens" in err.details()
    assert _metrics(stub)["active_sessions"] == 2
    again = Stream(stub, resumption(ids))
    resumed = next(again.replies).started
    tokens = [*started.first.tokens, *resumed.first.tokens, *_tokens_until_finish(again)]
    again.close()
    assert tokens == _greedy(loaded.model, ids, n)
    assert resumed.cached_prompt_tokens == len(ids)  # copied from the session it ended, not fed again
    with pytest.raises(grpc.RpcError) as err:
        list(quiet.replies)
    quiet.close()
    assert err.value.code() == grpc.StatusCode.ABORTED and "took it over" in err.value.details()
    taken_over = prometheus_samples(stub.GetMetrics(pb.MetricsRequest(), timeout=10).prometheus)
    assert taken_over["edgespec_sessions_taken_over_total"] == 1
    _let_go(other)


def test_idle_session_times_out_and_frees_its_kv(small_server):
    stub, info, _ = small_server
    s = Stream(stub, _start(info, max_new=20))
    next(s.replies)
    assert stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens > 0
    with pytest.raises(grpc.RpcError) as err:
        list(s.replies)  # the device never drafts
    s.close()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "KV cache" in err.value.details()
    assert wait_for(lambda: stub.GetMetrics(pb.MetricsRequest(), timeout=10).kv_used_tokens == 0)
