"""Cluster config: the shipped YAML files load; a bad field gives a message naming it."""

import dataclasses
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["local.yaml", "gpu-1p1d.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(DEPLOY / name)
    assert cfg.prefill.replicas >= 1 and cfg.decode.replicas >= 1


def test_local_default_is_the_embedded_cpu_cluster():
    cfg = load_config(DEPLOY / "local.yaml")
    assert (cfg.model, cfg.kv_dtype, cfg.device, cfg.transport) == ("smollm2-135m", "int8", "cpu", "gloo")
    assert (cfg.router.host, cfg.router.port) == ("127.0.0.1", 50051)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"kv_dtype": "int4"}, "kv_dtype"),
        ({"decode": {"replicas": -1}}, "decode.replicas"),
        ({"prefill": {"num_pages": "many"}}, "prefill.num_pages"),
        ({"prefil": {"replicas": 1}}, "prefil"),
        ({"router": {"port": 70000}}, "router.port"),
        ({"transport": "nccl"}, "transport"),
        ({"device": "cuda", "transport": "nccl"}, "gpus_per_worker"),
        ({"limits": {"request_timeout_s": 0}}, "limits.request_timeout_s"),
        ({"mode": "colocated"}, "prefill.replicas: must be 0 in colocated mode"),
        ({"mode": "mixed"}, "mode"),
        ({"prefill": {"speculative": {"drafter": "ngram"}}}, "prefill.speculative"),
        ({"decode": {"speculative": {"drafter": "eagle"}}}, "decode.speculative.drafter"),
        ({"decode": {"speculative": {"k": 0}}}, "decode.speculative.k"),
    ],
)
def test_bad_field_is_named(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(data, "test.yaml")


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_up_reports_bad_config_in_one_line(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "c.yaml"
    f.write_text("kv_dtype: int4\n")
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "-c", str(f)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "kv_dtype" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_graphs_switch_reaches_every_worker_engine(graphs):
    """`cuda_graphs` in a pool turns off its decode and prefill graphs; prefill workers never
    capture decode graphs; MoE models never capture either."""
    from cluster.launch import worker_spec

    cfg = parse_config({"device": "cuda", "transport": "nccl", "prefill": {"gpus_per_worker": 1, "cuda_graphs": graphs},
                        "decode": {"gpus_per_worker": 1, "cuda_graphs": graphs}}, "test.yaml")
    decode, prefill = worker_spec(cfg, "decode"), worker_spec(cfg, "prefill")
    d, p = decode.engine_config(is_moe=False), prefill.engine_config(is_moe=False, decode_graphs=False)
    assert (d.cuda_graphs, d.prefill_graphs) == (graphs, graphs)
    assert (p.cuda_graphs, p.prefill_graphs) == (False, graphs)
    moe = decode.engine_config(is_moe=True)
    assert (moe.cuda_graphs, moe.prefill_graphs) == (False, False)


@pytest.mark.parametrize("value", ["auto", "on", "off"])
def test_run_ahead_reaches_the_decode_engine(value):
    from cluster.launch import worker_spec

    cfg = parse_config({"decode": {"run_ahead": value}}, "test.yaml")
    assert worker_spec(cfg, "decode").engine_config(is_moe=False).decode_run_ahead == value
    rank = dataclasses.replace(worker_spec(cfg, "decode"), ep_rank=1, ep_size=2)  # as spawn_group makes it
    assert rank.engine_config(is_moe=False).decode_run_ahead == "off"  # Lockstep: one forward a step
    with pytest.raises(ConfigError, match="run_ahead"):
        parse_config({"decode": {"run_ahead": "sometimes"}}, "test.yaml")
