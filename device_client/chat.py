"""The conversation `device-client --chat` keeps, cut to the server's context.

Every turn sends the whole conversation (the server feeds what it has seen of it from its
prompt cache), so a long chat outgrows the model's context. Whole turns are dropped, oldest
first, and then more than the minimum: a turn's prompt must leave its answer room, and cutting
just enough would move the conversation's opening every turn, so the prompt cache, which reuses
the longest opening a prompt shares with one it has seen, would feed the whole conversation
again each turn. Cutting down to half the room keeps the opening fixed for the next turns.
"""
from __future__ import annotations

from device_client.text import DeviceTokenizer


class Conversation:
    def __init__(self, tokenizer: DeviceTokenizer, system: str | None, context: int, answer_tokens: int):
        """`context`: the server's (ServerInfo.max_context); `answer_tokens`: the room each
        answer should have (at most half the context, so a long --max-new-tokens does not cut
        every earlier turn)."""
        self.tokenizer = tokenizer
        self.system = system
        self.answer_room = min(answer_tokens, context // 2)
        self.limit = context - self.answer_room  # most tokens a turn's prompt may have
        self.turns: list[tuple[str, str]] = []  # (user, assistant), oldest first
        self.dropped = 0  # turns cut so far

    def prompt_ids(self, message: str) -> list[int]:
        """The conversation with `message` as the next user turn, after dropping the oldest turns
        if it would not leave the answer its room."""
        ids = self.tokenizer.chat_ids(message, self.system, self.turns)
        if len(ids) <= self.limit:
            return ids
        while self.turns and len(ids) > self.limit // 2:
            self.turns.pop(0)
            self.dropped += 1
            ids = self.tokenizer.chat_ids(message, self.system, self.turns)
        return ids

    def add(self, message: str, answer: str) -> None:
        self.turns.append((message, answer))
