"""Public API front line (bearer token, TLS, unparseable requests) and the KV receiver's checks.

No Ray, no model: a router over an empty worker table, and a KV receiver with stub callbacks.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import zlib

import grpc
import pytest

from cluster.client import Client, build_request
from kvtransfer.grpc_transport import KVReceiverService, header_to_pb, start_receiver_server
from kvtransfer.layout import KVHeader, KVTransferError
from protos.miniinfer.v1 import kvtransfer_pb2 as kpb
from protos.miniinfer.v1 import kvtransfer_pb2_grpc as kpb_grpc
from router.server import Router, RouterConfig, serve
from router.validate import Limits
from router.workers import WorkerTable

TOKEN = "s3cret-api-token"


def _run_router(check, **serve_kw):
    """Start a router (no workers) on loopback, run check(address) in a thread, stop it."""
    async def main():
        router = Router(RouterConfig(model="m", kv_dtype="fp32", transport="gloo"), None,
                        Limits(max_model_len=64, vocab_size=100), WorkerTable())
        server, port = await serve(router, "127.0.0.1", 0, **serve_kw)
        try:
            await asyncio.wait_for(asyncio.to_thread(check, f"127.0.0.1:{port}"), 60)
        finally:
            await server.stop(1)
            await router.stop()
    asyncio.run(main())


def test_bearer_token_required_and_bad_bytes_are_invalid_argument():
    def check(addr):
        with pytest.raises(grpc.RpcError) as e:
            Client(addr, token="").status()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            Client(addr, token="wrong").status()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert Client(addr, token=TOKEN).status().model == "m"
        # field 1 (prompt, a proto3 string) holding bytes that are not UTF-8
        ch = grpc.insecure_channel(addr)
        raw = ch.unary_stream("/miniinfer.v1.MiniInfer/Generate", request_serializer=None,
                              response_deserializer=None)
        for bad in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x10ab"):
            with pytest.raises(grpc.RpcError) as e:
                list(raw(bad, timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert "request" in e.value.details()
        ch.close()

    _run_router(check, api_token=TOKEN)


def test_cli_status_sends_the_api_token_from_the_environment(monkeypatch, capsys):
    from cluster.cli import main

    def check(addr):
        monkeypatch.delenv("MINIINFER_API_TOKEN", raising=False)
        assert main(["status", "--address", addr]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("MINIINFER_API_TOKEN", TOKEN)
        assert main(["status", "--address", addr]) == 0
        assert "model m" in capsys.readouterr().out

    _run_router(check, api_token=TOKEN)


def _bench_statuses(addr: str, **kw) -> set[str]:
    """Two requests from `miniinfer bench`'s load generator; -> the gRPC status names seen."""
    from cluster import loadgen

    specs = loadgen.make_workload(2, float("inf"), (4, 4), (2, 2), (1, 50), seed=0)
    records, _ = asyncio.run(loadgen.run_rate(addr, specs, timeout_s=10, **kw))
    return {r.status for r in records}


def test_bench_load_generator_sends_the_api_token(monkeypatch):
    monkeypatch.delenv("MINIINFER_TLS_CA", raising=False)

    def check(addr):
        monkeypatch.delenv("MINIINFER_API_TOKEN", raising=False)
        assert _bench_statuses(addr) == {"UNAUTHENTICATED"}
        assert _bench_statuses(addr, token="wrong") == {"UNAUTHENTICATED"}
        monkeypatch.setenv("MINIINFER_API_TOKEN", TOKEN)
        # past the token check: this router has no workers, so admission refuses the requests
        assert _bench_statuses(addr) == {"RESOURCE_EXHAUSTED"}

    _run_router(check, api_token=TOKEN)


def test_message_size_limit_is_resource_exhausted():
    def check(addr):
        with pytest.raises(grpc.RpcError) as e:
            list(Client(addr).generate(build_request("x" * 5000), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    _run_router(check, max_message_bytes=2048)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIINFER_TLS_CA", raising=False)  # tls_ca=None below must mean plaintext
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)

    def check(addr):
        assert Client(addr, token=TOKEN, tls_ca=str(cert)).status().model == "m"
        with pytest.raises(grpc.RpcError) as e:  # a plaintext client cannot talk to it
            Client(addr, token=TOKEN).status(timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # the bench's load generator reaches the router over TLS (which, with no workers,
        # refuses admission), and fails the handshake without the CA
        assert _bench_statuses(addr, token=TOKEN, tls_ca=str(cert)) == {"RESOURCE_EXHAUSTED"}
        assert _bench_statuses(addr, token=TOKEN, tls_ca=None) == {"UNAVAILABLE"}

    _run_router(check, api_token=TOKEN, tls_cert=str(cert), tls_key=str(key))


# ---- KV receiver: cluster token, header and checksum ----

def _header(num_bytes: int, crc: int) -> KVHeader:
    return KVHeader(request_id="r1", ticket_id="t1", num_tokens=3, num_layers=2, dtype="fp32", page_size=16,
                    num_kv_heads=1, head_dim=4, num_bytes=num_bytes, checksum=crc, first_token=5)


def _kv_roundtrip(chunks_for, validate_ok=True):
    """Push one payload into a receiver; -> (ack or error code, committed, cancelled)."""
    committed, cancelled = [], []

    def validate(h):
        if not validate_ok:
            raise KVTransferError("KV header rejected: head_dim 4 != 64")

    async def commit(h, blob):
        committed.append(blob)

    async def main():
        svc = KVReceiverService(validate, commit, lambda t, r: cancelled.append((t, r)) or True, "cluster-tok")
        server, addr = await start_receiver_server(svc)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                try:
                    return await kpb_grpc.KVTransferStub(ch).Push(chunks_for(), timeout=10)
                except grpc.aio.AioRpcError as e:
                    return e.code()
        finally:
            await server.stop(1)

    return asyncio.run(main()), committed, cancelled


def _chunks(token: str, blob: bytes, crc: int):
    async def gen():
        yield kpb.KVChunk(header=header_to_pb(_header(len(blob), crc), token), seq=0)
        yield kpb.KVChunk(seq=1, offset=0, data=blob)
    return gen


def test_kv_receiver_refuses_wrong_token_and_corrupt_payload():
    blob = bytes(range(96))
    ack, committed, _ = _kv_roundtrip(_chunks("cluster-tok", blob, zlib.crc32(blob)))
    assert ack.ok and committed == [blob]
    ack, committed, _ = _kv_roundtrip(_chunks("", blob, zlib.crc32(blob)))
    assert ack == grpc.StatusCode.UNAUTHENTICATED and committed == []
    ack, committed, cancelled = _kv_roundtrip(_chunks("cluster-tok", blob, zlib.crc32(blob) ^ 1))
    assert not ack.ok and "checksum" in ack.error and committed == [] and cancelled[0][0] == "t1"
    ack, committed, _ = _kv_roundtrip(_chunks("cluster-tok", blob, zlib.crc32(blob)), validate_ok=False)
    assert not ack.ok and "rejected" in ack.error and committed == []


def test_config_security_and_limit_fields():
    from cluster.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        parse_config({"router": {"tls_cert": "c.pem"}})
    with pytest.raises(ConfigError, match="limits.max_stop_strings"):
        parse_config({"limits": {"max_stop_strings": 17}})
    c = parse_config({"router": {"api_token": "t"}, "limits": {"max_retries": 0, "max_worker_requests": 8}})
    assert c.router.host == "127.0.0.1" and c.limits.max_retries == 0
