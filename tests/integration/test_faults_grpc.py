"""Fault points of the gRPC KV transport: half way through the chunk stream, and at the receiver.

A 2-prefill/1-decode cluster with fp32 KV: the request ends with the fault-free tokens, a
killed prefill worker is replaced, and nothing is left behind. (test_faults.py covers every
point on the gloo transport.)
"""

from __future__ import annotations

import pytest

from cluster.background import BackgroundCluster
from tests.integration.conftest import make_config
from tests.integration.reliability import arm, assert_settled, replacement, stream_ids
from tests.integration.test_faults import PROMPT, TIMEOUT, N

GRPC_CASES = [("transfer_half:kill:request={r}", "prefill"), ("decode_receiving:fail:request={r}", None)]


@pytest.fixture(scope="module")
def grpc_cluster(ray_session):
    c = BackgroundCluster(make_config(kv_dtype="fp32", transport="grpc", prefill={"replicas": 2},
                                      limits={"transfer_timeout_s": 3}))
    c.reference = stream_ids(c.stub, PROMPT, N, timeout=120)
    yield c
    arm(c, "")
    c.close()


@pytest.mark.parametrize("spec,replace", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_fault_point(grpc_cluster, spec, replace):
    c, rid = grpc_cluster, f"grpc-fault-{GRPC_CASES.index((spec, replace))}"
    before, retries = set(c.cluster.table.workers), c.cluster.router.retries
    arm(c, spec.format(r=rid))
    try:
        assert stream_ids(c.stub, PROMPT, N, TIMEOUT, rid) == c.reference
        assert c.cluster.router.retries > retries
    finally:
        arm(c, "")
    if replace is not None:
        replacement(c, replace, before)
    assert_settled(c)
