"""Prompt to token ids on the device: the server's tokenizer and chat template, no torch.

The ids the device sends are the truth; the server never re-tokenizes. The chat template is
rendered with jinja2 the way transformers renders it (trim_blocks, lstrip_blocks, sandboxed),
and the rendered text is encoded without extra special tokens, as apply_chat_template does.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class DeviceTokenizer:
    def __init__(self, tokenizer_json: Path, config_json: Path | None = None,
                 chat_template: Path | None = None):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.special: dict[str, str] = {}
        if config_json is not None and config_json.is_file():
            cfg = json.loads(config_json.read_text())
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = cfg.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    self.special[key] = value
        self.template = None
        if chat_template is not None and chat_template.is_file():
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self.template = env.from_string(chat_template.read_text())

    def chat_ids(self, prompt: str, system: str | None = None,
                 history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The user message `prompt` after the earlier (user, assistant) turns of `history`: a
        chat sends the whole conversation every turn, and the server feeds what it has seen of it
        from its prompt cache."""
        if self.template is None:
            raise ValueError("the server's model has no chat template; use --raw")
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        text = self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def raw_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns a growing list of token ids into printable text deltas.

    Decoding the whole sequence each time keeps multi-token characters and word-joining
    spaces right; text that ends in an incomplete UTF-8 sequence is held back.
    """

    def __init__(self, tokenizer: DeviceTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.printed = text[self.printed:], len(text)
        return delta
