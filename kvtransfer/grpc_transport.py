"""gRPC KV transport: the payload streamed in chunks into the decode worker's KVTransfer service.

For hosts without a shared NCCL fabric. The first chunk carries the header, which the
receiver validates before accepting any data; the commit happens only after every byte
arrived and the checksum matched.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable

import grpc

from kvtransfer import faults
from kvtransfer.base import KVSender
from kvtransfer.layout import KVHeader, KVPayload, KVTransferError, host_bytes
from kvtransfer.ticket import Ticket
from protos.miniinfer.v1 import kvtransfer_pb2 as pb
from protos.miniinfer.v1 import kvtransfer_pb2_grpc as pb_grpc

CHUNK_BYTES = 4 << 20
MAX_MESSAGE = 8 << 20


def header_to_pb(h: KVHeader, token: str) -> pb.KVHeader:
    return pb.KVHeader(
        request_id=h.request_id, ticket_id=h.ticket_id, num_tokens=h.num_tokens,
        num_layers=h.num_layers, dtype=h.dtype, page_size=h.page_size,
        num_kv_heads=h.num_kv_heads, head_dim=h.head_dim, layout_version=h.layout_version,
        num_bytes=h.num_bytes, checksum=h.checksum, first_token=h.first_token,
        cluster_token=token, sender_id=h.sender_id, scale_dtype="fp32" if h.dtype == "int8" else "",
    )


def header_from_pb(m: pb.KVHeader, first_logprob: float = 0.0) -> KVHeader:
    return KVHeader(
        request_id=m.request_id, ticket_id=m.ticket_id, num_tokens=m.num_tokens,
        num_layers=m.num_layers, dtype=m.dtype, page_size=m.page_size,
        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, num_bytes=m.num_bytes,
        checksum=m.checksum, first_token=m.first_token, layout_version=m.layout_version,
        first_logprob=first_logprob, sender_id=m.sender_id,
    )


class GrpcKVSender(KVSender):
    name = "grpc"

    def __init__(self, cluster_token: str = "") -> None:
        self.token = cluster_token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        ch = self._channels.get(address)
        if ch is None:
            opts = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
            ch = self._channels[address] = grpc.aio.insecure_channel(address, options=opts)
        return pb_grpc.KVTransferStub(ch)

    async def send(self, ticket: Ticket, header: KVHeader, payload: KVPayload, timeout: float) -> None:
        blob = host_bytes(payload.tensors())  # one device-to-host copy; chunks are slices of it

        offsets = range(0, len(blob), CHUNK_BYTES)

        async def chunks():
            yield pb.KVChunk(header=header_to_pb(header, self.token), seq=0, offset=0)
            for i, off in enumerate(offsets, 1):
                if faults.PLAN is not None and i == len(offsets) // 2 + 1:  # half the chunks are out
                    await faults.ahit("transfer_half", header.sender_id, header.request_id)
                yield pb.KVChunk(seq=i, offset=off, data=blob[off : off + CHUNK_BYTES].tobytes())

        try:
            ack = await self._stub(ticket.grpc_address).Push(chunks(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(f"grpc KV push to {ticket.decode_id} failed: {e.code().name} {e.details()}") from e
        if not ack.ok:
            raise KVTransferError(f"decode worker {ticket.decode_id} rejected KV: {ack.error}")

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


# Receiver: (header) -> expected payload byte count, or raises KVTransferError
ValidateFn = Callable[[KVHeader], None]
# Receiver: (header, blob) -> commit; raises KVTransferError
CommitFn = Callable[[KVHeader, bytes], Awaitable[None]]


class KVReceiverService(pb_grpc.KVTransferServicer):
    """Runs inside the decode worker. Validates the header first, then assembles and commits."""

    def __init__(self, validate: ValidateFn, commit: CommitFn, cancel: Callable[[str, str], bool],
                 cluster_token: str = "", chunk_timeout_s: float = 30.0) -> None:
        self.validate, self.commit, self.cancel = validate, commit, cancel
        self.token = cluster_token
        self.chunk_timeout_s = chunk_timeout_s

    async def Push(self, request_iterator, context):  # noqa: N802 - gRPC method name
        it = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), self.chunk_timeout_s)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return pb.PushAck(ok=False, error="no header chunk")
        if not first.HasField("header"):
            return pb.PushAck(ok=False, error="first chunk must carry the header")
        if self.token and first.header.cluster_token != self.token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad cluster token")
        header = header_from_pb(first.header)
        try:
            self.validate(header)
        except KVTransferError as e:
            return pb.PushAck(ok=False, error=str(e))
        # validate() checked num_bytes against the reservation, so this size is bounded
        buf = bytearray(header.num_bytes)
        view = memoryview(buf)
        got, expect_seq = 0, 1
        try:
            while got < header.num_bytes:
                chunk = await asyncio.wait_for(it.__anext__(), self.chunk_timeout_s)
                if chunk.seq != expect_seq or chunk.offset != got:
                    raise KVTransferError(f"chunk {chunk.seq} out of order (expected {expect_seq})")
                n = len(chunk.data)
                if n == 0 or got + n > header.num_bytes:
                    raise KVTransferError(f"chunk {chunk.seq} overruns the {header.num_bytes} bytes announced")
                view[got: got + n] = chunk.data
                got += n
                expect_seq += 1
            if header.checksum and zlib.crc32(buf) != header.checksum:
                raise KVTransferError("checksum mismatch")
            await self.commit(header, view)
        except (KVTransferError, StopAsyncIteration, asyncio.TimeoutError) as e:
            msg = str(e) or type(e).__name__
            self.cancel(header.ticket_id, msg)
            return pb.PushAck(ok=False, error=msg, bytes_received=got)
        except BaseException as e:  # sender died mid-stream (cancelled RPC): free the pages now
            self.cancel(header.ticket_id, f"KV stream broken: {type(e).__name__}")
            raise
        return pb.PushAck(ok=True, bytes_received=got)

    async def Cancel(self, request, context):  # noqa: N802
        if self.token and request.cluster_token != self.token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad cluster token")
        found = self.cancel(request.ticket_id, request.reason or "cancelled by sender")
        return pb.PushAck(ok=found)


async def start_receiver_server(service: KVReceiverService, host: str = "127.0.0.1") -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    pb_grpc.add_KVTransferServicer_to_server(service, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, f"{host}:{port}"
