"""KV transfer contract: export/import round trip, header validation, checksum, gRPC receiver."""

import asyncio
import dataclasses
import zlib

import pytest
import torch

from engine.kv_cache import KVCache, KVCacheSpec
from kvtransfer.grpc_transport import KVReceiverService, header_to_pb
from kvtransfer.layout import (
    KVHeader,
    KVTransferError,
    checksum,
    export_pages,
    import_pages,
    make_header,
    to_bytes,
    validate_header,
)
from protos.miniinfer.v1 import kvtransfer_pb2 as pb


def _cache(dtype=torch.int8, pages=8):
    return KVCache(KVCacheSpec(num_layers=2, num_pages=pages, num_kv_heads=2, head_dim=4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.bfloat16])
def test_export_import_roundtrip(dtype):
    src, dst = _cache(dtype), _cache(dtype)
    for layer in range(2):
        k, v = torch.randn(20, 2, 4), torch.randn(20, 2, 4)
        src.store(layer, k, v, torch.arange(16, 36))  # pages 1 and 2
    payload = export_pages(src, [1, 2], 20)
    import_pages(dst, [5, 3], payload)
    for layer in range(2):
        a = src.gather(layer, torch.tensor([1, 2]), 20, torch.float32)
        b = dst.gather(layer, torch.tensor([5, 3]), 20, torch.float32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _header(cache, tokens=20, **changes):
    payload = export_pages(cache, [0, 1], tokens)
    h = make_header(cache, payload, "r1", "t1", tokens, first_token=7)
    return dataclasses.replace(h, **changes), payload


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(dtype="bf16"), "dtype"),
        (dict(num_layers=3), "num_layers"),
        (dict(head_dim=8), "head_dim"),
        (dict(page_size=32), "page_size"),
        (dict(layout_version=2), "layout version"),
        (dict(num_bytes=1), "num_bytes"),
    ],
)
def test_header_mismatch_rejected(changes, needle):
    cache = _cache()
    h, _ = _header(cache, **changes)
    with pytest.raises(KVTransferError, match=needle):
        validate_header(h, cache, 20)


def test_header_token_count_must_match_reservation():
    cache = _cache()
    h, _ = _header(cache)
    validate_header(h, cache, 20)
    with pytest.raises(KVTransferError, match="num_tokens"):
        validate_header(h, cache, 21)


def test_checksum_is_crc32_of_the_bytes():
    cache = _cache()
    cache.store(0, torch.randn(20, 2, 4), torch.randn(20, 2, 4), torch.arange(20))
    h, payload = _header(cache)
    blob = b"".join(to_bytes(t) for t in payload.tensors())
    assert h.checksum == zlib.crc32(blob) == checksum(payload) and h.num_bytes == len(blob)


class _Ctx:
    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


def _push(service, chunks):
    async def it():
        for c in chunks:
            yield c

    return asyncio.run(service.Push(it(), _Ctx()))


def _service(cache, committed, cancelled):
    async def commit(h, blob):
        committed.append((h, blob))

    def cancel(ticket, reason):
        cancelled.append(reason)
        return True

    return KVReceiverService(lambda h: validate_header(h, cache, 20), commit, cancel, "secret")


def test_grpc_receiver_commits_good_payload_and_rejects_corrupt_one():
    cache = _cache()
    cache.store(0, torch.randn(20, 2, 4), torch.randn(20, 2, 4), torch.arange(20))
    h, payload = _header(cache)
    blob = b"".join(to_bytes(t) for t in payload.tensors())
    first = pb.KVChunk(header=header_to_pb(h, "secret"), seq=0)
    committed, cancelled = [], []
    svc = _service(cache, committed, cancelled)
    ack = _push(svc, [first, pb.KVChunk(seq=1, offset=0, data=blob)])
    assert ack.ok and committed[0][1] == blob and not cancelled

    bad = bytearray(blob)
    bad[3] ^= 0xFF
    ack = _push(svc, [first, pb.KVChunk(seq=1, offset=0, data=bytes(bad))])
    assert not ack.ok and "checksum" in ack.error and len(committed) == 1 and cancelled

    ack = _push(svc, [first, pb.KVChunk(seq=2, offset=0, data=blob)])
    assert not ack.ok and "out of order" in ack.error


def test_grpc_receiver_refuses_wrong_cluster_token():
    cache = _cache()
    h, _ = _header(cache)
    svc = _service(cache, [], [])
    with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
        _push(svc, [pb.KVChunk(header=header_to_pb(h, "wrong"), seq=0)])


def test_header_roundtrips_through_dict():
    cache = _cache()
    h, _ = _header(cache)
    assert KVHeader.from_dict(h.to_dict()) == h
