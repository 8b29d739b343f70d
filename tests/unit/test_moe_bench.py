"""bench/moe_ep.py on CPU (gloo, 4 processes): the script the four-GPU run uses works, and its
EP=4 layer gives the EP=1 layer's output."""

import json

from bench import moe_ep


def test_moe_ep_bench_four_ranks_on_cpu(tmp_path, capsys):
    out = tmp_path / "moe.jsonl"
    rc = moe_ep.main(["--cpu", "--ranks", "4", "--tokens", "8,40", "--hidden", "32", "--experts", "8",
                      "--top-k", "2", "--expert-width", "16", "--iters", "2", "--port", "29587",
                      "--json", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in recs] == [8, 40]
    for r in recs:
        assert r["ranks"] == 4 and "error" not in r
        assert r["epn_vs_ep1_rel_err"] < 1e-5  # fp32: the sharded layer == the single-rank one
        assert r["cross_bytes"] > 0 and r["combine_bytes"] > 0
        assert all(r[f"layer_ep{n}_s"] > 0 for n in (1, 2, 4))
    table = capsys.readouterr().out
    assert "EP=4 speed-up" in table and "EP=2 speed-up" in table


def test_moe_ep_bench_refuses_more_ranks_than_gpus(capsys):
    assert moe_ep.main(["--ranks", "64"]) == 2
    assert "needs 64 CUDA GPUs" in capsys.readouterr().err
