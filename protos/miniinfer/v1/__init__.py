"""protos.miniinfer.v1: generated stubs of miniinfer.proto and kvtransfer.proto.

Regenerate with ``python protos/generate.py``; import as
``from protos.miniinfer.v1 import miniinfer_pb2, miniinfer_pb2_grpc``.
"""
