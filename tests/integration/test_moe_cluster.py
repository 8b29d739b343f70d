"""A tiny Qwen3-MoE served with its decode pool as one expert-parallel group of 2 gloo ranks.

Each rank is a decode worker of its own (the router picks either); the two step in
lockstep, a rank without requests running idle steps so the all-to-alls always match.
Greedy tokens must equal HF generate's, both pools must end full, and the per-expert load
the ranks report must add up to exactly the decode tokens they ran.
"""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time

import pytest

from cluster.config import ConfigError
from cluster.controller import LiveChangeRefused, plan
from tests.helpers import hf_greedy, save_tiny_qwen3_moe
from tests.integration.conftest import make_config

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:",
           "Water boils at", "The quick brown fox"]
LENGTHS = [12, 5, 9, 16, 3, 7]  # uneven: ranks finish at different steps, one idles while the other runs
TOP_K = 2


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """Qwen3-MoE with random weights, SmolLM2's vocabulary and tokenizer (for the router)."""
    pytest.importorskip("transformers")
    from engine.loader.export import export_model_dir
    from engine.loader.registry import load_tokenizer

    path = tmp_path_factory.mktemp("qwen3moe")
    export_model_dir("smollm2-135m", path)  # tokenizer files (its config.json is replaced below)
    tok, base = load_tokenizer("smollm2-135m")
    hf = save_tiny_qwen3_moe(path, base, TOP_K, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=6)
    return path, hf, tok


def _stream(stub, prompt: str, n: int) -> list[int]:
    from cluster.client import build_request

    req = build_request(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
    return [t for msg in stub.Generate(req, timeout=120) for t in msg.token_ids]


def _decode_status(c) -> list[dict]:
    import ray

    workers = sorted(c.cluster.table.pool("decode"), key=lambda w: w.worker_id)
    return ray.get([w.handle.status.remote() for w in workers], timeout=30)


@pytest.fixture(scope="module")
def moe_cluster(ray_session, moe_dir):
    from cluster.background import BackgroundCluster

    c = BackgroundCluster(make_config(model=str(moe_dir[0]), kv_dtype="fp32", prefill={"num_pages": 64},
                                      decode={"replicas": 2, "ep_size": 2, "num_pages": 64},
                                      metrics={"port": 0}))
    yield c
    c.close()


def test_two_rank_ep_group_matches_hf(moe_cluster, moe_dir):
    c, (_, hf, tok) = moe_cluster, moe_dir
    # one request alone: one rank decodes it, the other only runs idle steps alongside
    assert _stream(c.stub, PROMPTS[0], LENGTHS[0]) == hf_greedy(hf, tok.encode(PROMPTS[0]), LENGTHS[0])
    alone = _decode_status(c)
    assert sorted(s["idle_steps"] > 0 for s in alone) == [False, True], alone
    # then concurrent requests of uneven lengths, spread over both ranks
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futs = [pool.submit(_stream, c.stub, p, n) for p, n in zip(PROMPTS, LENGTHS)]
        got = [f.result(timeout=120) for f in futs]
    for p, n, ids in zip(PROMPTS, LENGTHS, got):
        assert ids == hf_greedy(hf, tok.encode(p), n), p
    c.wait_pools_full()
    status = _decode_status(c)
    assert [(s["ep_rank"], s["ep_size"]) for s in status] == [(0, 2), (1, 2)]
    assert [s["local_experts"] for s in status] == [[0, 1, 2], [3, 4, 5]]  # each rank holds half
    assert all(s["alive"] for s in status)
    # every decode forward fed one token per request except its last (the prefill worker made
    # the first), and each token went to TOP_K experts in each layer
    fed = LENGTHS[0] - 1 + sum(n - 1 for n in LENGTHS)
    per_rank = [[sum(layer) for layer in s["expert_load"]] for s in status]
    assert all(len(layers) == 2 for layers in per_rank)
    assert [a + b for a, b in zip(*per_rank)] == [TOP_K * fed] * 2
    assert all(layers[0] > 0 for layers in per_rank), "one rank never got a request"
    assert all(s["expert_imbalance"] >= 1.0 for s in status)
    assert status[0]["steps"] == status[1]["steps"]  # lockstep: the same number of model calls
    _check_gauge(c, [layers[0] for layers in per_rank])
    # the same figures through the public API (GetClusterStatus), per decode worker
    api = {w.worker_id: w for p in c.status().pools if p.name == "decode" for w in p.workers}
    for wid, s in zip(sorted(api), status):
        w = api[wid]
        assert [list(layer.tokens) for layer in w.expert_load] == s["expert_load"]
        assert w.expert_imbalance == pytest.approx(s["expert_imbalance"]) and w.expert_imbalance >= 1.0
        assert (w.ep_rank, w.ep_size) == (s["ep_rank"], 2)
    prefill = [w for p in c.status().pools if p.name == "prefill" for w in p.workers]
    assert all(len(w.expert_load) == 2 and w.ep_size == 0 for w in prefill)
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", c.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith(("decode", "prefill"))}
    assert "experts: imbalance" in lines["p0"] and "EP rank" not in lines["p0"]
    assert "EP rank 0/2" in lines["d0"] and "EP rank 1/2" in lines["d1"]


def _check_gauge(c, layer0_per_rank: list[int], timeout_s: float = 10.0) -> None:
    """The Prometheus gauge shows each rank's layer-0 load (statuses refresh every 0.5 s)."""
    import urllib.request

    url = f"http://127.0.0.1:{c.cluster.metrics_port}/metrics"
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        got = [sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("miniinfer_moe_expert_load{") and f'worker="d{r}"' in line
                   and 'layer="0"' in line) for r in range(2)]
        skew = [line for line in text.splitlines() if line.startswith("miniinfer_moe_expert_imbalance{")]
        if got == layer0_per_rank or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == layer0_per_rank
    # one series per worker: the prefill worker runs the MoE layers too (all experts, no EP)
    assert sorted(line.split('"')[1] for line in skew) == ["d0", "d1", "p0"]
    assert all(float(line.rsplit(" ", 1)[1]) >= 1.0 for line in skew)


def test_a_dead_rank_takes_its_group_down_and_a_new_group_serves(moe_cluster, moe_dir):
    import ray

    c, (_, hf, tok) = moe_cluster, moe_dir
    old = sorted(w.worker_id for w in c.cluster.table.pool("decode"))
    ray.kill(c.cluster.table.get(old[1]).handle)  # rank 1 dies; rank 0 cannot step without it
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready = sorted(w.worker_id for w in c.cluster.table.pool("decode") if w.ready)
        if len(ready) == 2 and not set(ready) & set(old):
            break
        time.sleep(0.2)
    assert len(ready) == 2 and not set(ready) & set(old), f"no new group: {ready}"
    events = "\n".join(c.status().events)
    # whichever rank the cluster saw fail first (the killed one, or its peer whose collective
    # broke), the other is stopped with it
    assert any(f"{a} stopped: its expert-parallel group lost {b}" in events for a, b in (old, old[::-1]))
    with cf.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: _stream(c.stub, p, 6), PROMPTS[:2], timeout=120))
    assert got == [hf_greedy(hf, tok.encode(p), 6) for p in PROMPTS[:2]]
    assert sorted(s["ep_rank"] for s in _decode_status(c)) == [0, 1]
    assert len(c.cluster.groups) == 1  # the dead group's placement group was released
    c.wait_pools_full()


def test_ep_config_is_validated():
    ok = make_config(decode={"replicas": 4, "ep_size": 2})
    assert ok.decode.ep_size == 2
    bad = [
        (dict(decode={"replicas": 3, "ep_size": 2}), "decode.replicas"),
        (dict(prefill={"ep_size": 2}), "prefill.ep_size"),
        (dict(decode={"replicas": 2, "ep_size": 2, "autoscale": {"min_replicas": 2, "max_replicas": 4}}),
         "decode.autoscale"),
        (dict(decode={"ep_size": 0}), "decode.ep_size"),
    ]
    for overrides, field in bad:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            make_config(**overrides)


def test_ep_pool_cannot_be_resized_live():
    old = make_config(decode={"replicas": 2, "ep_size": 2})
    with pytest.raises(LiveChangeRefused, match=r"decode\.replicas .*expert-parallel"):
        plan(old, make_config(decode={"replicas": 4, "ep_size": 2}))
    with pytest.raises(LiveChangeRefused, match=r"decode\.ep_size"):
        plan(old, make_config(decode={"replicas": 2, "ep_size": 1}))
    assert plan(make_config(), make_config(decode={"replicas": 2})) == ["decode.replicas: 1 -> 2"]
