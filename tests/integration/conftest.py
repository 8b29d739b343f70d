"""Integration fixtures: one local Ray (loopback) per session; clusters run on a background loop."""

from __future__ import annotations

import os

import pytest

from cluster.background import BackgroundCluster
from cluster.config import parse_config


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=8, include_dashboard=False, namespace="miniinfer-tests",
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def make_config(**overrides):
    base = {
        "model": "smollm2-135m",
        "kv_dtype": "int8",
        "transport": "gloo",
        "router": {"host": "127.0.0.1", "port": 0},
        "prefill": {"replicas": 1, "num_pages": 256, "torch_threads": 2, "cpus_per_worker": 0.5},
        "decode": {"replicas": 1, "num_pages": 512, "torch_threads": 2, "cpus_per_worker": 0.5},
        "limits": {"max_prompt_tokens": 1024, "max_tokens": 512, "request_timeout_s": 120,
                   "transfer_timeout_s": 20},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return parse_config(base, "test config")


@pytest.fixture
def start_cluster(ray_session):
    """Start clusters inside one test; all are stopped when it ends."""
    started = []

    def start(**overrides) -> BackgroundCluster:
        c = BackgroundCluster(make_config(**overrides))
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


@pytest.fixture(scope="session")
def bounded_cluster(ray_session):
    """One default (int8 KV) 1p1d cluster with small bounds, shared by the fuzz and load tests:
    short answers by default, a router admission bound and a per-worker request bound."""
    c = BackgroundCluster(make_config(
        decode={"max_num_seqs": 64},
        limits={"max_tokens": 16, "default_max_tokens": 4, "max_active_requests": 256,
                "max_worker_requests": 128}))
    yield c
    c.close()
