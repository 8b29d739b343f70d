"""Hypothesis fuzzing of the public API: >= 2,000 malformed or extreme requests.

No request may end in UNKNOWN or INTERNAL (bad input is INVALID_ARGUMENT naming the field,
oversized input RESOURCE_EXHAUSTED), and afterwards the server still answers a valid request
and holds nothing. Valid requests that slip through are cheap: the cluster's default answer
is 4 tokens and at most 16 may be asked for.
"""

from __future__ import annotations

from collections import Counter

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.miniinfer.v1 import miniinfer_pb2 as pb
from tests.integration.reliability import assert_settled, stream_ids

FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
SENT = {"structured": 0, "raw": 0}
CODES: Counter = Counter()


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -0.0, 1.0]))
int32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(max_size=40)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "messages", "token_ids", "none", "huge"]))
    if kind == "prompt":
        req.prompt = draw(st.text(max_size=200))
    elif kind == "huge":
        req.prompt = "lorem ipsum " * draw(st.integers(700, 3000))  # over max_prompt_tokens
    elif kind == "messages":
        for _ in range(draw(st.integers(0, 4))):
            role = draw(st.one_of(st.sampled_from(["system", "user", "assistant"]), text))
            req.messages.messages.add(role=role, content=draw(st.text(max_size=80)))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=64)))
    sp = req.sampling
    for name, strat in (("temperature", floats), ("top_p", floats), ("min_p", floats), ("top_k", int32),
                        ("max_tokens", int32), ("seed", st.integers(0, 2**64 - 1))):
        if draw(st.booleans()):
            setattr(sp, name, draw(strat))
    sp.stop.extend(draw(st.lists(st.text(max_size=300), max_size=20)))
    sp.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=80)))
    sp.ignore_eos, sp.logprobs = draw(st.booleans()), draw(st.booleans())
    if draw(st.booleans()):
        req.model = draw(text)
    if draw(st.booleans()):
        req.request_id = draw(st.text(max_size=200))
    return req


def _check(call) -> None:
    try:
        for _ in call:
            pass
        CODES["OK"] += 1
    except grpc.RpcError as e:
        CODES[e.code().name] += 1
        assert e.code() not in FORBIDDEN, (e.code(), e.details())


def test_fuzz_structured_requests(bounded_cluster):
    @fuzz(1600)
    @given(requests())
    def run(req):
        SENT["structured"] += 1
        _check(bounded_cluster.stub.Generate(req, timeout=60))

    run()


def test_fuzz_raw_bytes(bounded_cluster):
    """Bytes that are not a request, or a request with a non-UTF-8 string, or a mangled one."""
    raw = bounded_cluster.channel.unary_stream("/miniinfer.v1.MiniInfer/Generate")
    valid = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=2)).SerializeToString()

    @fuzz(500)
    @given(st.one_of(st.binary(max_size=300),
                     st.binary(min_size=1, max_size=40).map(lambda b: b"\x0a" + bytes([len(b)]) + b),
                     st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255))
                     .map(lambda p: valid[: p[0]] + bytes([p[1]]) + valid[p[0] + 1:])))
    def run(data):
        SENT["raw"] += 1
        _check(raw(data, timeout=60))

    run()


def test_server_still_serves_after_fuzz(bounded_cluster):
    assert sum(SENT.values()) >= 2000, SENT
    # most were refused by validation, and some well-formed ones were served
    assert CODES["INVALID_ARGUMENT"] > sum(SENT.values()) / 2 and CODES["OK"] > 0, CODES
    ids = stream_ids(bounded_cluster.stub, "The capital of France is", 4)
    assert len(ids) == 4
    assert_settled(bounded_cluster)
