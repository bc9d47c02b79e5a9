"""Bad input: a gRPC status that says what to change, the session freed, the server serving."""
import math

import grpc
import pytest

from device_client.drafters.none import NoDrafter
from device_client.session import Request, generate
from shared.protocol import pb


def _start(info, prompt_ids=(1, 9690, 198), **overrides):
    fields = dict(prompt_token_ids=list(prompt_ids), max_new_tokens=8,
                  tokenizer_fingerprint=info.tokenizer_fingerprint,
                  sampling=pb.SamplingParams(temperature=0.0))
    fields.update(overrides)
    return pb.ClientMessage(start=pb.Start(**fields))


def _pipelined(info):
    # long enough that the server is still decoding when the drafts are checked
    return _start(info, mode=pb.MODE_PIPELINED, max_new_tokens=64)


def _draft(round_, tokens, parents):
    return pb.ClientMessage(draft=pb.Draft(round=round_, tokens=tokens, parents=parents))


def _run_script(stub, messages):
    """Sends the messages in order (each after the previous reply when one is due)."""
    replies = stub.Generate(iter(messages), timeout=60)
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in replies:
            got.append(reply)
    return err.value, got


def _assert_healthy(stub, info):
    assert stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10).active_sessions == 0
    rec = generate(stub, Request([1, 9690, 198, 2683], max_new_tokens=4), NoDrafter(),
                   info.tokenizer_fingerprint, timeout=60)
    assert len(rec.token_ids) == 4


CASES = {
    "draft before start": (lambda info: [_draft(1, [5], [0])], grpc.StatusCode.FAILED_PRECONDITION, "begin with Start"),
    "unknown tokenizer": (lambda info: [_start(info, tokenizer_fingerprint="abc123")],
                          grpc.StatusCode.FAILED_PRECONDITION, "tokenizer fingerprint"),
    "empty prompt": (lambda info: [_start(info, prompt_ids=())], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "prompt id out of range": (lambda info: [_start(info, prompt_ids=(1, 10**6))],
                               grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    "prompt over context": (lambda info: [_start(info, prompt_ids=[5] * info.max_context)],
                            grpc.StatusCode.OUT_OF_RANGE, "shorten it"),
    "nan temperature": (lambda info: [_start(info, sampling=pb.SamplingParams(temperature=math.nan))],
                        grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "inf temperature": (lambda info: [_start(info, sampling=pb.SamplingParams(temperature=math.inf))],
                        grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "negative temperature": (lambda info: [_start(info, sampling=pb.SamplingParams(temperature=-1))],
                             grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "top_p above one": (lambda info: [_start(info, sampling=pb.SamplingParams(temperature=1, top_p=1.5))],
                        grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "top_k above vocab": (lambda info: [_start(info, sampling=pb.SamplingParams(temperature=1, top_k=10**7))],
                          grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "zero max tokens": (lambda info: [_start(info, max_new_tokens=0)], grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
    "too many max tokens": (lambda info: [_start(info, max_new_tokens=10**6)], grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
    "stop id out of range": (lambda info: [_start(info, stop_token_ids=[10**6])],
                             grpc.StatusCode.INVALID_ARGUMENT, "stop token id"),
    "resume id out of range": (lambda info: [_start(info, resume_token_ids=[5, 10**6])],
                               grpc.StatusCode.INVALID_ARGUMENT, "resume token id 1000000 is out of range"),
    "resume with nothing left": (lambda info: [_start(info, resume_token_ids=[5] * 8)],
                                 grpc.StatusCode.OUT_OF_RANGE, "nothing is left to generate"),
    "resume past a stop token": (lambda info: [_start(info, resume_token_ids=[5, info.eos_token_ids[0], 6])],
                                 grpc.StatusCode.INVALID_ARGUMENT, "resume_token_ids[1] = "),
    "resume past the context": (lambda info: [_start(info, prompt_ids=[5] * (info.max_context - 4), max_new_tokens=64,
                                                     resume_token_ids=[5] * 4)],
                                grpc.StatusCode.OUT_OF_RANGE, "fill the model's context"),
    "draft token out of range": (lambda info: [_start(info), _draft(1, [10**6], [0])],
                                 grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    "parent not topological": (lambda info: [_start(info), _draft(1, [5, 6], [2, 0])],
                               grpc.StatusCode.INVALID_ARGUMENT, "parents must come before"),
    "parent out of range": (lambda info: [_start(info), _draft(1, [5, 6], [0, 99])],
                            grpc.StatusCode.INVALID_ARGUMENT, "parents must come before"),
    "parents count mismatch": (lambda info: [_start(info), _draft(1, [5, 6], [0])],
                               grpc.StatusCode.INVALID_ARGUMENT, "one parent per token"),
    "duplicate siblings": (lambda info: [_start(info), _draft(1, [5, 5], [0, 0])],
                           grpc.StatusCode.INVALID_ARGUMENT, "siblings"),
    "oversize tree": (lambda info: [_start(info), _draft(1, list(range(10, 10 + info.max_tree_nodes)),
                                                         list(range(info.max_tree_nodes)))],
                      grpc.StatusCode.INVALID_ARGUMENT, "--tree-budget"),
    "wrong round": (lambda info: [_start(info), _draft(7, [5], [0])], grpc.StatusCode.FAILED_PRECONDITION, "round"),
    "second start": (lambda info: [_start(info), _start(info)], grpc.StatusCode.FAILED_PRECONDITION, "Draft"),
    # lock-step at budget 1 (here the device's own cap): the server decodes alone, no Draft is due
    "draft at budget 1": (lambda info: [_start(info, tree_budget=1, max_new_tokens=64), _draft(1, [5], [0])],
                          grpc.StatusCode.FAILED_PRECONDITION, "no Draft is due"),
    "draft to server-ar": (lambda info: [_start(info, mode=pb.MODE_SERVER_AR, max_new_tokens=64), _draft(1, [5], [0])],
                           grpc.StatusCode.FAILED_PRECONDITION, "no Draft is due"),
    # pipelined: the server decodes on its own; drafts come on the side and are checked as they arrive
    "pipelined draft ahead of the server": (lambda info: [_pipelined(info), _draft(9, [5], [0])],
                                            grpc.StatusCode.FAILED_PRECONDITION, "ahead of the server"),
    "pipelined draft out of order": (lambda info: [_pipelined(info), _draft(1, [], []), _draft(1, [], [])],
                                     grpc.StatusCode.FAILED_PRECONDITION, "previous draft was round 1"),
    "pipelined bad tree": (lambda info: [_pipelined(info), _draft(1, [5, 6], [2, 0])],
                           grpc.StatusCode.INVALID_ARGUMENT, "parents must come before"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_status_and_server_keeps_serving(client, case):
    stub, info, _ = client
    make, code, needle = CASES[case]
    error, _ = _run_script(stub, make(info))
    assert error.code() == code, error.details()
    assert needle in error.details()
    _assert_healthy(stub, info)


def test_unknown_artifact_is_not_found(client):
    stub, info, _ = client
    with pytest.raises(grpc.RpcError) as err:
        list(stub.FetchArtifact(pb.ArtifactRequest(name="nope.bin"), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tokenizer.json" in err.value.details()


def test_other_session_survives_a_bad_one(client):
    """A good session in flight keeps its tokens while another session fails."""
    import queue

    stub, info, _ = client
    up = queue.Queue()
    up.put(_start(info, max_new_tokens=3))
    good = stub.Generate(iter(up.get, None), timeout=60)
    first = next(good)
    error, _ = _run_script(stub, [_start(info), _draft(1, [5, 6], [2, 0])])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    rest = []
    for round_ in (1, 2):  # lock-step: each Draft after the verdict it builds on
        up.put(_draft(round_, [], []))
        rest.append(next(good))
    up.put(None)
    assert list(good) == []
    tokens = list(first.started.first.tokens) + [t for m in rest for t in m.verdict.tokens]
    assert len(tokens) == 3
    assert rest[-1].verdict.finish_reason == pb.FINISH_LENGTH
