"""Generated gRPC/protobuf stubs (from proto/edgespec.proto via scripts/gen_proto.py)."""
from . import edgespec_pb2 as pb
from . import edgespec_pb2_grpc as rpc

# Trailing metadata of a RESOURCE_EXHAUSTED that waiting will cure (a busy server): in how many
# milliseconds to try again. A refusal without it will not pass by waiting.
RETRY_AFTER_MS = "retry-after-ms"

__all__ = ["pb", "rpc", "RETRY_AFTER_MS"]
