"""`device-client --chat` past the model's context: the oldest turns are dropped, whole, down to
half the room, so the conversation goes on and its opening stays put for the prompt cache."""
import json
import subprocess
import sys

import pytest

from device_client.chat import Conversation
from edge_server.launcher import ServerProcess

from conftest import ROOT


def test_drops_the_oldest_turns_down_to_half_the_room_and_keeps_the_opening(client):
    tok = client[2]
    chat = Conversation(tok, "Be brief.", context=300, answer_tokens=40)
    assert chat.limit == 260
    said = []
    for i in range(8):
        message = f"Question {i}: name {i + 2} rivers of the world and their lengths."
        ids = chat.prompt_ids(message)
        assert len(ids) <= chat.limit
        said.append((chat.dropped, ids))
        chat.add(message, f"Answer {i}: " + "the Nile, the Amazon, the Yangtze. " * 3)
    drops = [d for d, _ in said]
    assert drops[0] == 0 and drops[-1] > 0, drops
    cut = next(k for k, d in enumerate(drops) if d)
    assert len(said[cut][1]) <= chat.limit // 2  # cut to half the room, not just to fit
    assert "Question 0" not in tok.decode(said[cut][1]) and "Be brief." in tok.decode(said[cut][1])
    assert drops[cut + 1] == drops[cut]  # the turn after a cut fits: it sends the same opening
    before, after = said[cut][1], said[cut + 1][1]
    assert after[:len(before) - 8] == before[:len(before) - 8]  # all but the assistant header


def test_a_message_alone_too_long_is_sent_as_it_is(client):
    chat = Conversation(client[2], None, context=64, answer_tokens=8)
    chat.add("hi", "hello")
    ids = chat.prompt_ids("word " * 100)
    assert len(ids) > chat.limit and chat.turns == []  # the server says what to change (OUT_OF_RANGE)


@pytest.fixture(scope="module")
def small_context_server():
    srv = ServerProcess(["--log-level", "WARNING", "--max-context", "384", "--threads", "1"])
    yield srv
    srv.stop()


def test_a_chat_longer_than_the_context_goes_on_with_the_latest_turns(small_context_server, served):
    messages = [f"Tell me three facts about the number {n}, one line each, with a short reason."
                for n in (7, 12, 19, 23, 31, 42)]
    out = subprocess.run(
        [sys.executable, "-m", "device_client.cli", "--server", small_context_server.address, "--json", "--chat",
         "--drafter", "ngram", "--max-new-tokens", "48"],
        input="\n".join(messages) + "\n", cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    turns = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"text"')]
    assert len(turns) == len(messages)
    assert turns[-1]["chat_turns_dropped"] > 0 and "oldest turn(s)" in out.stderr
    for turn in turns:
        assert len(turn["prompt_token_ids"]) + 48 <= 384
        assert turn["token_ids"] == served.greedy(turn["prompt_token_ids"], 48)
