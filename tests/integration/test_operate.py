"""Operating a live cluster: apply resizes under load, autoscaling, metrics, dead-worker restart.

One cluster serves the whole module (start-up is the expensive part); every test leaves it
at 1P1D with full page pools.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cluster.background import BackgroundCluster
from cluster.client import build_request
from engine.llm import EngineConfig, LLMEngine
from engine.sampling import SamplingParams
from protos.miniinfer.v1 import miniinfer_pb2 as pb
from tests.integration.conftest import make_config

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "The quick brown fox"]
N = 10
# fp32 KV: token-identical to the local engine under any batching (see test_cluster.py)
BASE = dict(kv_dtype="fp32", transport="gloo", metrics={"port": 0}, controller={"tick_s": 0.25})
READY = pb.WORKER_STATE_READY


@pytest.fixture(scope="module")
def reference(smollm2):
    eng = LLMEngine(smollm2, EngineConfig(kv_dtype="fp32", num_pages=64))
    return [eng.generate([smollm2.tokenizer.encode(p)], SamplingParams(max_tokens=N))[0].token_ids
            for p in PROMPTS]


@pytest.fixture(scope="module")
def cluster_1p1d(ray_session):
    c = BackgroundCluster(make_config(**BASE))
    yield c
    c.close()


@pytest.fixture
def live(cluster_1p1d):
    """The module's cluster, back at 1P1D with the base config (whatever the last test left)."""
    apply(cluster_1p1d, config_yaml())
    wait_for(cluster_1p1d, settled({"prefill": 1, "decode": 1}), 120, "1P1D")
    cluster_1p1d.wait_pools_full()
    return cluster_1p1d


def config_yaml(**over) -> str:
    return yaml.safe_dump(make_config(**{**BASE, **over}).model_dump())


def apply(c, text: str, **kw) -> pb.ApplyConfigResponse:
    return c.stub.ApplyConfig(pb.ApplyConfigRequest(config_yaml=text, **kw), timeout=10)


def sizes(st) -> dict:
    return {p.name: sum(w.state == READY for w in p.workers) for p in st.pools}


def wait_for(c, check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        st = c.status()
        if check(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s:\n{st}")
        time.sleep(0.25)


def settled(want: dict):
    return lambda st: sizes(st) == want and all(len(p.workers) == want[p.name] for p in st.pools)


def stream(c, i: int, timeout: float = 60):
    ids, last = [], None
    for msg in c.stub.Generate(build_request(PROMPTS[i], max_tokens=N, temperature=0.0), timeout=timeout):
        ids.extend(msg.token_ids)
        last = msg
    return ids, last


class Load:
    """Client threads streaming requests back to back until stopped (bounded count and time)."""

    def __init__(self, c, threads: int = 3, max_requests: int = 80, max_s: float = 150) -> None:
        self.c, self.results, self.errors = c, [], []
        self.stop_at = time.monotonic() + max_s
        self.max_requests, self._stop = max_requests, threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        n = k
        while not self._stop.is_set() and time.monotonic() < self.stop_at:
            with self._lock:
                if len(self.results) + len(self.errors) >= self.max_requests:
                    return
            i = n % len(PROMPTS)
            n += 1
            try:
                ids, _ = stream(self.c, i)
                with self._lock:
                    self.results.append((i, ids))
            except grpc.RpcError as e:
                with self._lock:
                    self.errors.append(f"{e.code().name}: {e.details()}")

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def finish(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(90)


def scrape(c) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{c.cluster.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_metrics_move_when_requests_flow(live, reference):
    before = scrape(live)
    for i in range(len(PROMPTS)):
        ids, last = stream(live, i)
        assert ids == reference[i]
    live.wait_pools_full()
    time.sleep(0.8)  # one status refresh, so worker-fed series catch up
    after = scrape(live)
    for name in ("miniinfer_ttft_seconds_count", "miniinfer_e2e_seconds_count", "miniinfer_tpot_seconds_count"):
        assert total(after, name) - total(before, name) == len(PROMPTS), name
    assert total(after, "miniinfer_ttft_seconds_sum") > total(before, "miniinfer_ttft_seconds_sum")
    assert total(after, "miniinfer_generated_tokens_total") - total(before, "miniinfer_generated_tokens_total") \
        == sum(len(r) for r in reference)
    assert total(after, "miniinfer_kv_transfer_bytes_total") > total(before, "miniinfer_kv_transfer_bytes_total")
    assert total(after, "miniinfer_kv_transfer_seconds_count") - total(before, "miniinfer_kv_transfer_seconds_count") \
        == len(PROMPTS)
    steps = total(after, "miniinfer_engine_steps_total", pool="decode", mode="eager")
    assert steps > total(before, "miniinfer_engine_steps_total", pool="decode", mode="eager")
    assert total(after, "miniinfer_engine_steps_total", mode="graph") == 0  # no CUDA graphs on CPU
    assert total(after, "miniinfer_kv_transfer_failures_total") == 0
    st = live.status()
    for p in st.pools:
        for w in p.workers:
            lab = dict(pool=p.name, worker=w.worker_id)
            assert total(after, "miniinfer_kv_pages_free", **lab) == w.pages_total > 0
            assert total(after, "miniinfer_kv_pages_used", **lab) == 0
            assert total(after, "miniinfer_worker_ready", **lab) == 1
    assert ("miniinfer_queue_depth", (("pool", "prefill"),)) in after
    assert total(after, "miniinfer_pool_desired_replicas", pool="decode") == 1
    # clean requests: nothing re-prefilled, no leg left running for the router to reap
    assert ("miniinfer_request_retries_total", ()) in after
    assert total(after, "miniinfer_request_retries_total") == total(after, "miniinfer_orphan_legs_reaped_total") == 0


def test_apply_scales_1p1d_to_2p2d_and_back_under_load(live, reference, tmp_path):
    # changes that cannot be applied live are refused, naming the field; nothing changes
    with pytest.raises(grpc.RpcError) as e:
        apply(live, config_yaml(kv_dtype="int8", prefill={"replicas": 2}))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "kv_dtype" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        apply(live, "decode: {replicas: -1}\n")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode.replicas" in e.value.details()
    assert sizes(live.status()) == {"prefill": 1, "decode": 1}

    # enough requests to last every phase below (their waits add up to ~510 s at most): with
    # 80 the load ran dry before the new workers were ready once decode got fast
    load = Load(live, max_requests=400, max_s=540)
    try:
        wait_for(live, lambda st: load.count() >= 3, 60, "first requests")
        # scale up through the CLI, as a user would
        path = tmp_path / "2p2d.yaml"
        path.write_text(config_yaml(prefill={"replicas": 2}, decode={"replicas": 2}))
        r = subprocess.run([sys.executable, "-m", "cluster.cli", "apply", "-c", str(path), "--address",
                            live.address, "--wait", "120"], capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stderr
        assert "prefill.replicas: 1 -> 2" in r.stdout and "settled: prefill 2, decode 2" in r.stdout
        n_up = load.count()
        # the new workers take traffic: every worker of 2P2D has run engine steps
        wait_for(live, lambda st: load.count() >= n_up + 6 and all(
            total(scrape(live), "miniinfer_engine_steps_total", worker=w.worker_id) > 0
            for p in st.pools for w in p.workers), 90, "requests on every worker of 2P2D")
        res = apply(live, config_yaml())
        assert set(res.changes) == {"prefill.replicas: 2 -> 1", "decode.replicas: 2 -> 1"}
        st = wait_for(live, settled({"prefill": 1, "decode": 1}), 120, "1P1D")
        n_down = load.count()
        wait_for(live, lambda st: load.count() >= n_down + 3, 90, "requests after scaling down")
    finally:
        load.finish()
    assert load.errors == []
    assert len(load.results) >= 12
    for i, ids in load.results:
        assert ids == reference[i], f"prompt {i}"
    assert sum("drained" in e for e in st.events) == 2
    live.wait_pools_full()


def test_queue_growth_makes_the_autoscaler_add_a_worker(live):
    scale = {"autoscale": {"min_replicas": 1, "max_replicas": 2, "metric": "queue_depth", "target": 1.0,
                           "up_cooldown_s": 0, "down_cooldown_s": 2, "down_window_s": 2}}
    apply(live, config_yaml(prefill={"replicas": 1, **scale}))
    st = live.status()
    assert st.pools[0].autoscale.max_replicas == 2 and st.pools[0].autoscale.metric == "queue_depth"
    long = " ".join(["The history of the river and the valley around it is long."] * 12)
    done, errors = [], []

    def one(k: int) -> None:
        try:
            req = build_request(f"{k}: {long}", max_tokens=4, temperature=0.0, ignore_eos=True)
            done.append(sum(len(m.token_ids) for m in live.stub.Generate(req, timeout=120)))
        except grpc.RpcError as e:
            errors.append(e.details())

    def scaled_up(st) -> bool:
        """The autoscaler asked for a second prefill worker, and one became ready after that."""
        ev = list(st.events)
        up = [i for i, e in enumerate(ev) if "autoscale prefill" in e and "1 -> 2" in e]
        return bool(up) and any(e.split()[1].startswith("p") and " ready after " in e for e in ev[up[0]:])

    threads = []
    try:
        deadline = time.monotonic() + 60
        # bursts of long prompts until the prefill queue has been seen and acted on
        while live.status().pools[0].desired_replicas < 2 and time.monotonic() < deadline and len(threads) < 36:
            batch = [threading.Thread(target=one, args=(len(threads) + j,), daemon=True) for j in range(12)]
            threads += batch
            for t in batch:
                t.start()
            time.sleep(1.5)
        st = wait_for(live, scaled_up, 90, "a second prefill worker ready")
        assert "queue_depth" in st.pools[0].autoscale.last_decision
    finally:
        for t in threads:
            t.join(120)
    assert errors == [] and done == [4] * len(threads)
    assert not any("died" in e for e in live.status().events)
    # idle again: the pool shrinks back after its window and cool-down
    st = wait_for(live, settled({"prefill": 1, "decode": 1}), 60, "scale-down to 1")
    assert any("autoscale prefill" in e and "2 -> 1" in e for e in st.events)
    apply(live, config_yaml())
    live.wait_pools_full()


def test_killed_worker_is_replaced_and_traffic_resumes(live, reference):
    import ray

    table = live.cluster.table
    (victim,) = [w for w in table.pool("decode")]
    health = health_pb2_grpc.HealthStub(live.channel)

    def serving() -> bool:
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING

    assert serving()
    ray.kill(victim.handle)
    t0 = time.monotonic()
    while victim.ready and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not victim.ready, "the router kept the dead worker routable"
    saw_not_serving = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ok = serving()
        saw_not_serving |= not ok
        ws = [w for w in table.pool("decode") if w.ready]
        if ok and ws and ws[0].worker_id != victim.worker_id:
            break
        time.sleep(0.1)
    assert saw_not_serving, "health stayed SERVING with no decode worker"
    st = live.status()
    (dec,) = [p for p in st.pools if p.name == "decode"]
    assert [w.state for w in dec.workers] == [READY] and dec.workers[0].worker_id != victim.worker_id
    assert any(victim.worker_id in e and "died" in e for e in st.events)
    for i in range(len(PROMPTS)):
        ids, _ = stream(live, i)
        assert ids == reference[i]
    live.wait_pools_full()
