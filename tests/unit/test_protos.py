"""The protobuf API: committed stubs are fresh, and messages behave as documented."""

from __future__ import annotations

import shutil
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from protos import generate as gen
from protos.miniinfer.v1 import (
    kvtransfer_pb2,
    kvtransfer_pb2_grpc,
    miniinfer_pb2,
    miniinfer_pb2_grpc,
)

pb = miniinfer_pb2
kv = kvtransfer_pb2


# ------------------------------------------------------------ stale stubs --


@pytest.fixture(scope="module")
def fresh() -> dict[str, bytes]:
    """A fresh generation of the committed protos (protoc runs once per module)."""
    return gen.render(gen.PROTOS_ROOT)


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    """A copy of the protos root (sources and committed stubs) to tamper with."""
    root = tmp_path / "protos"
    shutil.copytree(gen.PROTOS_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_committed_stubs_are_fresh():
    stale = gen.check(gen.PROTOS_ROOT)
    assert stale == [], f"run `python protos/generate.py`; stale: {stale}"


def test_check_cli_exit_code(capsys):
    assert gen.main(["--check"]) == 0
    assert "fresh" in capsys.readouterr().out


def test_every_proto_has_its_stubs(fresh):
    protos = gen.proto_files(gen.PROTOS_ROOT)
    assert protos == ["miniinfer/v1/kvtransfer.proto", "miniinfer/v1/miniinfer.proto"]
    assert sorted(fresh) == gen.generated_files(gen.PROTOS_ROOT)
    assert len(fresh) == 3 * len(protos)


def test_generation_is_deterministic_and_location_independent(fresh, protos_copy):
    # Same inputs in another folder give byte-identical output.
    assert gen.render(protos_copy) == fresh


def test_check_reports_modified_stub(protos_copy):
    assert gen.check(protos_copy) == []
    target = protos_copy / "miniinfer/v1/miniinfer_pb2_grpc.py"
    target.write_bytes(target.read_bytes() + b"# hand edit\n")
    assert gen.check(protos_copy) == ["miniinfer/v1/miniinfer_pb2_grpc.py (differs)"]
    assert gen.main(["--check", "--root", str(protos_copy)]) == 1


def test_check_reports_proto_edited_without_regenerating(protos_copy, capsys):
    proto = protos_copy / "miniinfer/v1/kvtransfer.proto"
    text = proto.read_text()
    proto.write_text(
        text.replace(
            "  uint64 bytes_received = 3;\n", "  uint64 bytes_received = 3;\n  uint32 extra = 4;\n"
        )
    )
    assert proto.read_text() != text
    stale = gen.check(protos_copy)
    # The message stubs change; the service stub does not.
    assert stale == [
        "miniinfer/v1/kvtransfer_pb2.py (differs)",
        "miniinfer/v1/kvtransfer_pb2.pyi (differs)",
    ]
    assert gen.main(["--check", "--root", str(protos_copy)]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "kvtransfer_pb2.py (differs)" in err
    # Regenerating fixes it.
    assert gen.main(["--root", str(protos_copy)]) == 0
    assert gen.check(protos_copy) == []


def test_check_reports_missing_and_orphaned_stubs(protos_copy):
    (protos_copy / "miniinfer/v1/kvtransfer_pb2.pyi").unlink()
    (protos_copy / "miniinfer/v1/old_pb2.py").write_text("# left over\n")
    (protos_copy / "miniinfer/v1/__init__.py").unlink()
    assert gen.check(protos_copy) == [
        "miniinfer/v1/kvtransfer_pb2.pyi (missing)",
        "miniinfer/v1/old_pb2.py (no .proto generates it)",
        "miniinfer/v1/__init__.py (missing)",
    ]
    changed = gen.generate(protos_copy)
    assert changed == [
        "miniinfer/v1/__init__.py",
        "miniinfer/v1/kvtransfer_pb2.pyi",
        "miniinfer/v1/old_pb2.py",
    ]
    assert gen.check(protos_copy) == []
    assert not (protos_copy / "miniinfer/v1/old_pb2.py").exists()


def test_fix_imports():
    src = (
        "import grpc\n"
        "from miniinfer.v1 import common_pb2 as miniinfer_dot_v1_dot_common__pb2\n"
        "import miniinfer.v1.other_pb2\n"
        "from miniinferx import y\n"
    )
    assert gen.fix_imports(src) == (
        "import grpc\n"
        "from protos.miniinfer.v1 import common_pb2 as miniinfer_dot_v1_dot_common__pb2\n"
        "import protos.miniinfer.v1.other_pb2\n"
        "from miniinferx import y\n"
    )
    for rel, content in gen.render(gen.PROTOS_ROOT).items():
        assert b"from miniinfer." not in content, rel


# ------------------------------------------------------------- round trip --


def _roundtrip(msg):
    data = msg.SerializeToString(deterministic=True)
    back = type(msg).FromString(data)
    assert back == msg
    return back


@pytest.mark.parametrize("which", ["prompt", "messages", "token_ids"])
def test_generate_request_oneof_input(which):
    inputs = {
        "prompt": {"prompt": "Hello"},
        "messages": {
            "messages": pb.ChatMessages(
                messages=[
                    pb.ChatMessage(role="system", content="Be brief."),
                    pb.ChatMessage(role="user", content="Hi"),
                ]
            )
        },
        "token_ids": {"token_ids": pb.TokenIds(ids=[1, 2, 50000])},
    }
    req = _roundtrip(pb.GenerateRequest(request_id="r1", **inputs[which]))
    assert req.WhichOneof("input") == which
    for other in inputs:
        assert req.HasField(other) == (other == which)
    if which == "messages":
        assert [m.role for m in req.messages.messages] == ["system", "user"]
    if which == "token_ids":
        assert list(req.token_ids.ids) == [1, 2, 50000]


def test_oneof_setting_one_clears_the_other():
    req = pb.GenerateRequest(prompt="x")
    req.token_ids.ids.append(7)
    assert req.WhichOneof("input") == "token_ids"
    assert not req.HasField("prompt")
    assert pb.GenerateRequest().WhichOneof("input") is None


OPTIONAL_SAMPLING = ["temperature", "top_p", "top_k", "min_p", "seed", "max_tokens"]


def test_sampling_optional_fields_unset_differs_from_zero():
    unset = _roundtrip(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams()))
    assert unset.HasField("sampling")
    for name in OPTIONAL_SAMPLING:
        assert not unset.sampling.HasField(name), name

    zeros = pb.SamplingParams(temperature=0.0, top_p=0.0, top_k=0, min_p=0.0, seed=0, max_tokens=0)
    back = _roundtrip(pb.GenerateRequest(prompt="x", sampling=zeros))
    for name in OPTIONAL_SAMPLING:
        assert back.sampling.HasField(name), name
        assert getattr(back.sampling, name) == 0

    back.sampling.ClearField("temperature")
    assert not back.sampling.HasField("temperature")


def test_sampling_params_values_roundtrip():
    sp = pb.SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=2**64 - 1,
        max_tokens=128,
        stop=["\n\n", "</s>"],
        stop_token_ids=[2, 32000],
        ignore_eos=True,
        logprobs=True,
    )
    req = _roundtrip(
        pb.GenerateRequest(
            prompt="x",
            model="smollm2-135m",
            sampling=sp,
            skip_special_tokens=False,
            add_special_tokens=True,
        )
    )
    s = req.sampling
    assert s.temperature == pytest.approx(0.7)  # float32 on the wire
    assert s.top_p == pytest.approx(0.9)
    assert s.min_p == pytest.approx(0.05)
    assert (s.top_k, s.seed, s.max_tokens) == (40, 2**64 - 1, 128)
    assert list(s.stop) == ["\n\n", "</s>"]
    assert list(s.stop_token_ids) == [2, 32000]
    assert s.ignore_eos and s.logprobs
    # Explicit false is distinguishable from unset (whose default is true).
    assert req.HasField("skip_special_tokens") and req.skip_special_tokens is False
    assert not pb.GenerateRequest(prompt="x").HasField("skip_special_tokens")
    assert pb.GenerateRequest(prompt="x").model == ""


def test_generate_response_roundtrip():
    first = _roundtrip(
        pb.GenerateResponse(
            request_id="r1", token_ids=[9906], text="Hello", logprobs=[-0.25], ttft_s=0.031
        )
    )
    assert first.finish_reason == pb.FINISH_REASON_NONE
    assert not first.HasField("usage")
    last = _roundtrip(
        pb.GenerateResponse(
            request_id="r1",
            token_ids=[13, 2],
            text=".",
            finish_reason=pb.FINISH_REASON_STOP,
            finish_message="eos",
            usage=pb.Usage(prompt_tokens=5, completion_tokens=3),
            e2e_s=0.2,
        )
    )
    assert pb.FinishReason.Name(last.finish_reason) == "FINISH_REASON_STOP"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 3)
    assert [pb.FinishReason.Name(v) for v in pb.FinishReason.values()] == [
        "FINISH_REASON_NONE",
        "FINISH_REASON_STOP",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_ABORT",
        "FINISH_REASON_ERROR",
    ]


def test_cluster_status_roundtrip():
    status = pb.ClusterStatus(
        model="smollm2-135m",
        kv_dtype="int8",
        kv_page_size=16,
        kv_transport="gloo",
        max_model_len=2048,
        queue_depth=2,
        active_requests=5,
        pools=[
            pb.PoolStatus(
                name="prefill",
                desired_replicas=1,
                workers=[
                    pb.WorkerStatus(worker_id="p0", state=pb.WORKER_STATE_READY, pages_total=64)
                ],
            ),
            pb.PoolStatus(
                name="decode",
                desired_replicas=2,
                workers=[
                    pb.WorkerStatus(
                        worker_id="d0",
                        state=pb.WORKER_STATE_DRAINING,
                        address="127.0.0.1:50061",
                        pages_total=100,
                        pages_free=60,
                        pages_used=40,
                        running=3,
                        waiting=1,
                        warmup_s=1.5,
                        num_devices=1,
                    )
                ],
            ),
        ],
    )
    back = _roundtrip(status)
    assert [p.name for p in back.pools] == ["prefill", "decode"]
    d0 = back.pools[1].workers[0]
    assert pb.WorkerState.Name(d0.state) == "WORKER_STATE_DRAINING"
    assert d0.pages_free + d0.pages_used == d0.pages_total


def test_kv_chunk_roundtrip():
    header = kv.KVHeader(
        request_id="r1",
        ticket_id="t1",
        num_tokens=37,
        num_layers=30,
        dtype="int8",
        page_size=16,
        num_kv_heads=3,
        head_dim=64,
        layout_version=1,
        scale_dtype="float32",
        num_bytes=123456,
        checksum=0xFFFFFFFF,
        first_token=42,
        cluster_token="secret",
        sender_id="p0",
    )
    first = _roundtrip(kv.KVChunk(header=header, seq=0, offset=0, data=b""))
    assert first.HasField("header") and first.header.checksum == 0xFFFFFFFF
    data = _roundtrip(kv.KVChunk(seq=1, offset=0, data=bytes(range(256)) * 4))
    assert not data.HasField("header")
    assert data.data == bytes(range(256)) * 4
    ack = _roundtrip(kv.PushAck(ok=False, error="checksum mismatch", bytes_received=10))
    assert not ack.ok and ack.error == "checksum mismatch"


def test_service_shapes():
    svc = pb.DESCRIPTOR.services_by_name["MiniInfer"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert shapes == {
        "Generate": (False, True),
        "Abort": (False, False),
        "GetClusterStatus": (False, False),
        "Tokenize": (False, False),
        "ApplyConfig": (False, False),
    }
    kvsvc = kv.DESCRIPTOR.services_by_name["KVTransfer"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in kvsvc.methods}
    assert shapes == {"Push": (True, False), "Cancel": (False, False)}
    assert pb.DESCRIPTOR.package == kv.DESCRIPTOR.package == "miniinfer.v1"
    assert pb.DESCRIPTOR.name == "miniinfer/v1/miniinfer.proto"


# -------------------------------------------------- the stubs over a wire --


class _Front(miniinfer_pb2_grpc.MiniInferServicer):
    def Generate(self, request, context):
        for i, word in enumerate(request.prompt.split()):
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[i], text=word)
        yield pb.GenerateResponse(
            request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH
        )


class _Receiver(kvtransfer_pb2_grpc.KVTransferServicer):
    def Push(self, request_iterator, context):
        chunks = list(request_iterator)
        if not chunks or not chunks[0].HasField("header"):
            return kv.PushAck(ok=False, error="no header")
        got = sum(len(c.data) for c in chunks)
        return kv.PushAck(ok=got == chunks[0].header.num_bytes, bytes_received=got)


def test_stubs_over_grpc():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    miniinfer_pb2_grpc.add_MiniInferServicer_to_server(_Front(), server)
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(_Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            front = miniinfer_pb2_grpc.MiniInferStub(channel)
            out = list(
                front.Generate(pb.GenerateRequest(prompt="a b c", request_id="r"), timeout=10)
            )
            assert [m.text for m in out] == ["a", "b", "c", ""]
            assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
            # Unimplemented methods fail cleanly.
            with pytest.raises(grpc.RpcError) as e:
                front.Abort(pb.AbortRequest(request_id="r"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

            receiver = kvtransfer_pb2_grpc.KVTransferStub(channel)
            chunks = [
                kv.KVChunk(seq=0, header=kv.KVHeader(ticket_id="t", num_bytes=6)),
                kv.KVChunk(seq=1, offset=0, data=b"abc"),
                kv.KVChunk(seq=2, offset=3, data=b"def"),
            ]
            ack = receiver.Push(iter(chunks), timeout=10)
            assert ack.ok and ack.bytes_received == 6
    finally:
        server.stop(None)
