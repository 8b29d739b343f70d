"""Autoscaler decisions over synthetic load traces; live-change planning of `apply`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.autoscale import Policy, Sample, decide, prune, recommend
from cluster.config import ConfigError, load_config, parse_config
from cluster.controller import LiveChangeRefused, plan

POLICY = Policy(min_replicas=1, max_replicas=4, metric="queue_depth", target=2.0,
                up_cooldown_s=5.0, down_cooldown_s=20.0, down_window_s=20.0)


def replay(policy: Policy, total_load, seconds: int, start: int = 1, dt: float = 1.0) -> list[int]:
    """Feed a load trace (total queued requests at time t) through decide, as the controller
    does: one sample per tick, value per replica, decisions applied at once. -> sizes."""
    replicas, last, samples, sizes = start, None, [], []
    for i in range(int(seconds / dt)):
        now = i * dt
        samples = prune([*samples, Sample(now, total_load(now) / replicas, replicas)], now,
                        policy.down_window_s + 1)
        d = decide(policy, samples, replicas, last, now)
        if d.changes(replicas):
            replicas, last = d.replicas, now
        sizes.append(replicas)
    return sizes


def changes(sizes: list[int]) -> int:
    return sum(a != b for a, b in zip(sizes, sizes[1:]))


def test_recommend_scales_with_load_within_bounds():
    assert recommend(POLICY, Sample(0, 6.0, 1)) == 3  # 6 queued on 1 worker, target 2 each
    assert recommend(POLICY, Sample(0, 2.1, 2)) == 2  # within the 10 % tolerance
    assert recommend(POLICY, Sample(0, 100.0, 2)) == 4  # max_replicas
    assert recommend(POLICY, Sample(0, 0.0, 3)) == 1  # min_replicas


def test_scales_up_under_a_burst():
    sizes = replay(POLICY, lambda t: 8.0 if t >= 10 else 0.0, 40)
    assert sizes[9] == 1
    assert sizes[10] == 4  # 8 queued / target 2, in one step, as soon as it is seen
    assert max(sizes) == 4


def test_scales_down_only_after_the_window_and_cool_down():
    sizes = replay(POLICY, lambda t: 8.0 if t < 30 else 0.0, 90, start=4)
    assert sizes[29] == 4
    # load gone at t=30: the window (20 s) must be quiet before shrinking
    assert all(s == 4 for s in sizes[30:50])
    assert sizes[60] == 1 and sizes[-1] == 1
    assert changes(sizes) == 1


def test_oscillating_load_does_not_flap():
    # the queue swings between idle and busy every 3 s: without the window and cool-down,
    # every swing would resize the pool (about 30 changes in 90 s)
    sizes = replay(POLICY, lambda t: 6.0 if int(t / 3) % 2 else 0.0, 90)
    assert changes(sizes) <= 2, sizes
    assert sizes[-1] == 3


def test_up_cooldown_limits_successive_scale_ups():
    pol = Policy(1, 8, "queue_depth", 1.0, up_cooldown_s=10.0, down_cooldown_s=60, down_window_s=60)
    # load keeps growing by one request a second
    sizes = replay(pol, lambda t: t, 30)
    ups = [i for i in range(1, len(sizes)) if sizes[i] > sizes[i - 1]]
    assert len(ups) >= 2
    assert all(b - a >= 10 for a, b in zip(ups, ups[1:])), ups


def test_bounds_are_enforced_even_without_samples():
    assert decide(POLICY, [], 7, None, 0.0).replicas == 4
    assert decide(POLICY, [], 0, None, 0.0).replicas == 1
    assert decide(POLICY, [], 2, None, 0.0).replicas == 2


def test_ttft_metric_scales_on_latency():
    pol = Policy(1, 3, "ttft_p90", target=0.5, up_cooldown_s=0, down_cooldown_s=5, down_window_s=5)
    assert decide(pol, [Sample(0, 1.6, 1)], 1, None, 0).replicas == 3
    assert decide(pol, [Sample(0, 0.5, 2)], 2, None, 0).replicas == 2


# ---- config and apply planning ----

BASE = {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}


def cfg(**over):
    d = {k: dict(v) for k, v in BASE.items()}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_config(d, "test")


def test_autoscale_config_is_validated():
    with pytest.raises(ConfigError, match=r"decode.autoscale: min_replicas \(3\) is above max_replicas"):
        cfg(decode={"autoscale": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="prefill.autoscale.metric"):
        cfg(prefill={"autoscale": {"metric": "vibes"}})
    with pytest.raises(ConfigError, match="kv_usage is a fraction"):
        cfg(decode={"autoscale": {"metric": "kv_usage", "target": 80}})


def test_plan_lists_live_changes():
    new = cfg(prefill={"replicas": 2}, decode={"replicas": 3, "autoscale": {"max_replicas": 4}})
    lines = plan(cfg(), new)
    assert "prefill.replicas: 1 -> 2" in lines and "decode.replicas: 1 -> 3" in lines
    assert any(x.startswith("decode.autoscale") for x in lines)
    assert plan(cfg(), cfg()) == []
    assert plan(cfg(), cfg(ray_address="auto")) == []  # a launch option, not compared


@pytest.mark.parametrize("change, field", [
    (dict(kv_dtype="fp32"), "kv_dtype"),
    (dict(model="other.gguf"), "model"),
    (dict(transport="grpc"), "transport"),
    (dict(dtype="bf16"), "dtype"),
    (dict(decode={"num_pages": 64}), "decode.num_pages"),
])
def test_plan_refuses_changes_that_need_a_restart(change, field):
    with pytest.raises(LiveChangeRefused, match=rf"cannot change {field} .*Restart with"):
        plan(cfg(), cfg(prefill={"replicas": 2}, **change))


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_multinode_deploy_files_are_valid():
    multi = load_config(DEPLOY / "gpu-multinode.yaml")
    assert (multi.device, multi.transport, multi.kv_host, multi.ray_address) == ("cuda", "nccl", "node", "auto")
    assert multi.decode.autoscale.max_replicas > multi.decode.autoscale.min_replicas
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay-raycluster.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "RayCluster", "Service"}
    embedded = parse_config(yaml.safe_load(kinds["ConfigMap"]["data"]["cluster.yaml"]), "kuberay")
    assert embedded.ray_address == "auto" and embedded.device == "cuda"
    gpu = kinds["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert launcher["provider"]["type"] == "local" and launcher["head_start_ray_commands"]
    assert load_config(DEPLOY / "local.yaml").metrics.host == "127.0.0.1"


def test_cli_apply_fails_cleanly(tmp_path, capsys):
    from cluster.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("decode: {autoscale: {min_replicas: 2, max_replicas: 1}}\n")
    assert main(["apply", "-c", str(bad)]) == 2
    assert "decode.autoscale: min_replicas (2) is above max_replicas" in capsys.readouterr().err
    ok = tmp_path / "ok.yaml"
    ok.write_text("router: {port: 0}\n")
    assert main(["apply", "-c", str(ok)]) == 2
    assert "give the running cluster's --address" in capsys.readouterr().err
    assert main(["apply", "-c", str(ok), "--address", "127.0.0.1:1", "--timeout", "3"]) == 2
    assert "apply refused by 127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err
