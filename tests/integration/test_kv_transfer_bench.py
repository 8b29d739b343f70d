"""bench/kv_transfer.py end to end on CPU (gloo + gRPC, tiny shape): it runs and every transfer verifies."""

from __future__ import annotations

from bench import kv_transfer


def test_kv_transfer_bench_moves_exact_pages_on_cpu(capsys):
    results = kv_transfer.main(["--device", "cpu", "--tokens", "40,300", "--iters", "1", "--timeout", "120"])
    assert [(r["kv"], r["tokens"]) for r in results] == [("bf16", 40), ("bf16", 300), ("int8", 40), ("int8", 300)]
    for r in results:
        # the receiver compared every transferred page (and int8 scale) with the sender's
        assert r["verified"] and r["grpc_verified"], r
        assert r["raw_gbps"] > 0 and r["ours_gbps"] > 0 and r["grpc_gbps"] > 0
    int8 = {r["tokens"]: r["bytes"] for r in results if r["kv"] == "int8"}
    bf16 = {r["tokens"]: r["bytes"] for r in results if r["kv"] == "bf16"}
    assert all(int8[t] < bf16[t] for t in int8)  # int8 pages + fp32 scales still move fewer bytes
    assert "ours/raw" in capsys.readouterr().out
