"""The public API's front line: lenient request parsing, bearer-token auth, TLS credentials.

A request that does not parse (bad wire bytes, a string field that is not UTF-8) would
otherwise fail inside gRPC's deserializer as INTERNAL; here it becomes INVALID_ARGUMENT.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from protos.miniinfer.v1 import miniinfer_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["MiniInfer"]


class BadRequest:
    """What the lenient deserializer hands over when the bytes are not a valid request."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return BadRequest(f"request: not a valid {cls.DESCRIPTOR.name} ({e}); strings must be UTF-8")
    return parse


def _guard(fn, streaming: bool):
    if streaming:
        async def stream_behavior(request, context):
            if isinstance(request, BadRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for msg in fn(request, context):
                yield msg
        return stream_behavior

    async def unary_behavior(request, context):
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await fn(request, context)
    return unary_behavior


def add_service(servicer, server: grpc.aio.Server) -> None:
    """Register the MiniInfer methods the servicer implements, with lenient request parsing."""
    handlers = {}
    for m in SERVICE.methods:
        if m.name not in type(servicer).__dict__:
            continue  # not implemented: gRPC answers UNIMPLEMENTED
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(_guard(getattr(servicer, m.name), m.server_streaming),
                                request_deserializer=_lenient(getattr(pb, m.input_type.name)),
                                response_serializer=lambda msg: msg.SerializeToString())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every MiniInfer call must carry `authorization: Bearer <token>`; health and reflection stay open."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE.full_name}/"):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.expected):
            return await continuation(details)
        return _DENY


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")


_DENY = grpc.unary_unary_rpc_method_handler(_deny)


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])
