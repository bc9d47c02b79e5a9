"""Downloads the server's artifacts once and caches them by sha256 under $EDGESPEC_HOME."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from shared.protocol import pb, rpc


def cache_root() -> Path:
    return Path(os.environ.get("EDGESPEC_HOME", Path.home() / ".cache" / "edgespec")) / "artifacts"


def fetch(stub: rpc.EdgeSpecStub, info: pb.ArtifactInfo, root: Path | None = None) -> Path:
    """The local path of an artifact, downloading and checking it only if it is not cached."""
    target = (root or cache_root()) / info.sha256 / info.name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in stub.FetchArtifact(pb.ArtifactRequest(name=info.name, sha256=info.sha256)):
                digest.update(chunk.data)
                fh.write(chunk.data)
        if digest.hexdigest() != info.sha256:
            raise IOError(f"artifact {info.name} arrived with sha256 {digest.hexdigest()}, "
                          f"expected {info.sha256}; retry the download")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def fetch_all(stub: rpc.EdgeSpecStub, server_info: pb.ServerInfo, names: list[str]) -> dict[str, Path]:
    """Fetches the named artifacts the server has; missing names are left out."""
    by_name = {a.name: a for a in server_info.artifacts}
    return {name: fetch(stub, by_name[name]) for name in names if name in by_name}
