"""Files the device downloads from the server: tokenizer, chat template, drafter heads.

Each artifact is named, digested with sha256 and streamed in chunks; the device caches it by
digest, so it needs no local model files and never holds a stale copy.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from transformers import PreTrainedTokenizerBase

from shared.fingerprint import sha256_file

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
HEADS_META = "heads.json"
HEADS_DIR = Path(__file__).resolve().parent / "heads"


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path
    sha256: str
    size: int

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb") as fh:
            offset = 0
            while data := fh.read(CHUNK_BYTES):
                yield offset, data
                offset += len(data)


class ArtifactStore:
    def __init__(self) -> None:
        self._items: dict[str, Artifact] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="edgespec-artifacts-")

    def add(self, name: str, path: Path) -> Artifact:
        art = Artifact(name, path, sha256_file(path), path.stat().st_size)
        self._items[name] = art
        return art

    def get(self, name: str) -> Artifact | None:
        return self._items.get(name)

    def __iter__(self) -> Iterator[Artifact]:
        return iter(sorted(self._items.values(), key=lambda a: a.name))

    def add_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """Saves the served tokenizer (fast tokenizer JSON + chat template); returns its digest."""
        out = Path(self._tmp.name) / "tokenizer"
        tokenizer.save_pretrained(out)
        if not (out / TOKENIZER).is_file():
            raise ValueError("the model's tokenizer has no fast (tokenizer.json) form the device can load")
        template = tokenizer.chat_template
        if template and not (out / CHAT_TEMPLATE).is_file():
            (out / CHAT_TEMPLATE).write_text(template if isinstance(template, str) else json.dumps(template))
        for name in (TOKENIZER, TOKENIZER_CONFIG, CHAT_TEMPLATE):
            if (out / name).is_file():
                self.add(name, out / name)
        return self._items[TOKENIZER].sha256

    def add_heads(self, model_name: str, fingerprint: str) -> bool:
        """Serves the drafter heads shipped for this model, if their fingerprint matches it."""
        folder = HEADS_DIR / model_name
        meta_path = folder / "heads.json"
        if not meta_path.is_file():
            return False
        meta = json.loads(meta_path.read_text())
        if meta.get("model_fingerprint") != fingerprint:
            log.warning("not serving heads in %s: trained for model fingerprint %s, this model is %s",
                        folder, meta.get("model_fingerprint"), fingerprint)
            return False
        onnx = meta.get("onnx", "heads.int8.onnx")
        self.add(HEADS_META, meta_path)
        self.add(onnx, folder / onnx)
        return True
