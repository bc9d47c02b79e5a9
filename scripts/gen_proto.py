"""Regenerate the protocol stubs in shared/protocol from proto/edgespec.proto.

The stubs are committed so the device needs no grpcio-tools; tests/test_proto_fresh.py
fails when they fall behind the .proto file.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "shared" / "protocol"
GENERATED = ("edgespec_pb2.py", "edgespec_pb2_grpc.py", "edgespec_pb2.pyi")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", str(PROTO_DIR / "edgespec.proto"),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
        for name in GENERATED:
            text = (Path(tmp) / name).read_text()
            # protoc writes a top-level import; the stubs live inside shared.protocol.
            text = re.sub(r"^import edgespec_pb2 as", "from . import edgespec_pb2 as", text, flags=re.M)
            (out_dir / name).write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    generate(args.out)
    print(f"wrote {', '.join(GENERATED)} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
