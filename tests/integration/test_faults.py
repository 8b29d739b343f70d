"""Every fault point: the request ends with the fault-free output or its defined status, in time,
and afterwards every page pool is full and no request is left in any table.

One 2-prefill/2-decode cluster (fp32 KV, so re-prefilled output is token-identical) serves the
whole module; the controller replaces a killed worker with a fresh one (new id, hence new
pairwise groups), and the test checks the newcomer serves.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import pytest

from cluster.background import BackgroundCluster
from tests.integration.conftest import make_config
from tests.integration.reliability import (
    arm,
    assert_settled,
    replacement,
    stream_ids,
    worker_tables,
)

PROMPT = "The three most useful kitchen tools are"
N = 12
TIMEOUT = 60.0

# (fault spec, expected outcome, pool whose killed worker is replaced afterwards). A plan is
# per process, so a one-shot fault names the request's first attempt ({r}): whichever worker
# takes it fails, and the re-prefilled attempt (a new id) runs clean.
CASES = [
    ("prefill_running:fail:request={r}", "same", None),
    ("prefill_running:kill:request={r}", "same", "prefill"),
    ("transfer_started:fail:request={r}", "same", None),
    ("transfer_started:kill:request={r}", "same", "prefill"),
    ("transfer_half:fail:request={r}", "same", None),
    ("transfer_half:delay:request={r},delay_s=5", "same", None),  # over transfer_timeout_s: both sides time out
    ("decode_receiving:fail:request={r}", "same", None),
    ("decode_receiving:kill:request={r}", "same", "decode"),
    ("decode_running:fail:request={r},after=4", "same", None),
    ("decode_running:kill:request={r},after=4", "same", "decode"),
    ("decode_running:delay:request={r},after=2,delay_s=0.5", "same", None),
    ("router_streaming:delay:after=2,delay_s=0.5", "same", None),
    ("router_streaming:fail:after=3", grpc.StatusCode.UNAVAILABLE, None),
    ("prefill_running:fail:times=0", grpc.StatusCode.UNAVAILABLE, None),  # every prefill worker fails it
    ("decode_running:fail:times=0,after=2", grpc.StatusCode.UNAVAILABLE, None),
]


@pytest.fixture(scope="module")
def cluster(ray_session):
    c = BackgroundCluster(make_config(kv_dtype="fp32", transport="gloo", prefill={"replicas": 2},
                                      decode={"replicas": 2},
                                      limits={"transfer_timeout_s": 3, "max_retries": 2}))
    c.reference = stream_ids(c.stub, PROMPT, N, timeout=120)
    yield c
    arm(c, "")
    c.close()


@pytest.mark.parametrize("spec,outcome,replace", CASES, ids=[c[0] for c in CASES])
def test_fault_point(cluster, spec, outcome, replace):
    rid = f"fault-{CASES.index((spec, outcome, replace))}"
    before = set(cluster.cluster.table.workers)
    arm(cluster, spec.format(r=rid))
    t0, retries = time.monotonic(), cluster.cluster.router.retries
    try:
        if outcome == "same":
            assert stream_ids(cluster.stub, PROMPT, N, TIMEOUT, rid) == cluster.reference
            if ":fail" in spec or ":kill" in spec or "transfer_half:delay" in spec:  # the fault did fire
                assert cluster.cluster.router.retries > retries
        else:
            with pytest.raises(grpc.RpcError) as e:
                stream_ids(cluster.stub, PROMPT, N, TIMEOUT, rid)
            assert e.value.code() == outcome, e.value.details()
        assert time.monotonic() - t0 < TIMEOUT
    finally:
        arm(cluster, "")
    if replace is not None:
        new = replacement(cluster, replace, before)
        _check_new_worker_serves(cluster, new)
    assert_settled(cluster)


def _check_new_worker_serves(c, new_id: str) -> None:
    """A replacement worker takes traffic over fresh pairwise groups and gives the same tokens."""
    with cf.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: stream_ids(c.stub, PROMPT, N, TIMEOUT), range(4)))
    assert all(o == c.reference for o in outs)
    st = worker_tables(c)[new_id]
    assert st.get("prefilled", 0) > 0 or st.get("transfers_ok", 0) > 0, f"{new_id} took no request: {st}"



def test_abort_rpc_during_prefill_ends_the_stream_without_a_retry(cluster):
    """The Abort RPC while the prefill's reply is held back: the stream ends with ABORT, no
    re-prefill starts, nothing is left behind. (The router also marks the request aborted so
    that a leg failing *because of* the abort is never retried; this timing does not force
    that race, it checks the outcome.)"""
    from protos.miniinfer.v1 import miniinfer_pb2 as pb

    rid = "abort-mid-prefill"
    arm(cluster, f"prefill_running:delay:request={rid},delay_s=3")
    retries = cluster.cluster.router.retries

    def collect():
        from cluster.client import build_request

        req = build_request(PROMPT, max_tokens=N, temperature=0.0, request_id=rid)
        return list(cluster.stub.Generate(req, timeout=TIMEOUT))

    try:
        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(collect)
            deadline = time.monotonic() + 20
            while rid not in cluster.cluster.router.active:
                assert time.monotonic() < deadline, "the request never reached the router"
                time.sleep(0.02)
            time.sleep(0.5)  # inside the injected prefill delay
            found = cluster.stub.Abort(pb.AbortRequest(request_id=rid), timeout=10).found
            msgs = fut.result(timeout=TIMEOUT)
    finally:
        arm(cluster, "")
    assert found
    assert msgs and msgs[-1].finish_reason == pb.FINISH_REASON_ABORT
    # the prefill may finish its first token while the injected delay holds its reply back:
    # that token can still arrive, but generation does not go on
    assert sum(len(m.token_ids) for m in msgs) <= 1
    assert cluster.cluster.router.retries == retries
    assert_settled(cluster)
