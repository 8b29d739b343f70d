"""The user's path: `miniinfer up -c`, then `generate`, `status`, `down`, as subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_up_generate_status_down(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kv_dtype: int8\ntransport: gloo\nrouter: {host: 127.0.0.1, port: 0}\n"
                   "prefill: {num_pages: 128}\ndecode: {num_pages: 256, torch_threads: 1}\n")
    log = open(tmp_path / "up.log", "w+")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "-c", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        port, deadline = None, time.monotonic() + 300
        while port is None and time.monotonic() < deadline:
            assert proc.poll() is None, open(log.name).read()
            m = re.search(r"ready: miniinfer generate --address 127\.0\.0\.1:(\d+)", open(log.name).read())
            port = m and m.group(1)
            time.sleep(0.5)
        assert port, open(log.name).read()
        addr = f"127.0.0.1:{port}"

        with grpc.insecure_channel(addr) as ch:
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.SERVING

        r = cli("generate", "--address", addr, "--max-tokens", "12", "--json", "The capital of France is")
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)
        assert "Paris" in row["text"] and len(row["token_ids"]) <= 12

        r = cli("generate", "--address", addr, "--chat", "--max-tokens", "8", "Say hi")
        assert r.returncode == 0 and r.stdout.strip(), r.stderr

        r = cli("status", "--address", addr)
        assert r.returncode == 0 and "prefill" in r.stdout and "decode" in r.stdout and "READY" in r.stdout

        r = cli("generate", "--address", addr, "--json", "--max-tokens", "5", "--model", "gpt-9", "hi")
        assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr

        out = tmp_path / "bench"
        r = cli("bench", "--address", addr, "--mix", "tiny", "--rate", "20,inf", "--num-requests", "6",
                "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(out), timeout=240)
        assert r.returncode == 0, r.stderr
        assert "goodput" in r.stdout and "highest rate with >= 90% attainment: 20 req/s" in r.stdout
        result = json.loads((out / "bench.json").read_text())
        assert [run["summary"]["rate"] for run in result["runs"]] == [20, "inf"]
        for run in result["runs"]:
            assert run["summary"]["ok"] == 6 and run["summary"]["slo_attainment"] == 1.0
            for rec in run["records"]:  # ignore_eos: every request produces exactly max_tokens
                assert rec["status"] == "OK" and rec["output_tokens"] == rec["max_tokens"], rec
                assert 0 < rec["ttft_s"] <= rec["e2e_s"] and len(rec["itl_s"]) == rec["output_tokens"] - 1
        for png in ("latency_cdf.png", "goodput_vs_rate.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        r = cli("down", "--port", port)
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=60)
        assert "shutting down" in open(log.name).read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def test_status_and_down_without_cluster_fail_cleanly():
    r = cli("status", "--address", "127.0.0.1:1", "--timeout", "2")
    assert r.returncode == 2 and "cannot reach" in r.stderr
    r = cli("down", "--port", "1")
    assert r.returncode == 2 and "no cluster" in r.stderr
    r = cli("bench", "--address", "127.0.0.1:1", "--num-requests", "2")
    assert r.returncode == 2 and "cannot reach" in r.stderr
