"""TLS material from PEM files, read the same way by both command lines."""
from __future__ import annotations

from pathlib import Path


def pem_bytes(path: str) -> bytes:
    """The file's bytes: OSError when it cannot be read, ValueError when it is not PEM."""
    data = Path(path).read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path}: not a PEM file (no '-----BEGIN' line)")
    return data


def read_pem(path: str, flag: str) -> bytes:
    """The file's bytes, or SystemExit saying which flag named a file that is missing or not PEM."""
    try:
        return pem_bytes(path)
    except OSError as err:
        raise SystemExit(f"{flag} {path}: {err.strerror}") from None
    except ValueError as err:
        raise SystemExit(f"{flag} {err}") from None
