"""TLS material from PEM files, read the same way by both command lines."""
from __future__ import annotations

from pathlib import Path


def read_pem(path: str, flag: str) -> bytes:
    """The file's bytes, or SystemExit saying which flag named a file that is missing or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SystemExit(f"{flag} {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SystemExit(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data
