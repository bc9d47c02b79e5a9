"""Generated gRPC/protobuf stubs (from proto/edgespec.proto via scripts/gen_proto.py)."""
from . import edgespec_pb2 as pb
from . import edgespec_pb2_grpc as rpc

__all__ = ["pb", "rpc"]
