"""`miniinfer bench` pieces that need no cluster: workload, statistics, argument errors."""

from __future__ import annotations

import math
import statistics

import pytest

from cluster import loadgen
from cluster.cli import main
from cluster.errors import CLIError
from cluster.loadgen import RequestRecord


def test_workload_is_seeded_poisson_within_ranges():
    a = loadgen.make_workload(2000, 5.0, (16, 512), (4, 64), (100, 200), seed=3)
    b = loadgen.make_workload(2000, 5.0, (16, 512), (4, 64), (100, 200), seed=3)
    assert [s.prompt_ids for s in a[:20]] == [s.prompt_ids for s in b[:20]]
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.1)  # exponential gaps, mean 1/rate
    assert statistics.pstdev(gaps) == pytest.approx(1 / 5.0, rel=0.15)  # exponential: sd == mean
    lens = [len(s.prompt_ids) for s in a]
    assert min(lens) >= 16 and max(lens) <= 512 and min(lens) < 24 and max(lens) > 400
    assert all(4 <= s.max_tokens <= 64 for s in a)
    assert all(100 <= t < 200 for s in a[:50] for t in s.prompt_ids)
    burst = loadgen.make_workload(10, math.inf, (8, 8), (2, 2), (100, 200), seed=0)
    assert all(s.arrival_s == 0 for s in burst) and all(len(s.prompt_ids) == 8 for s in burst)


def test_percentile_matches_linear_interpolation():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert loadgen.percentile(vals, 50) == 3.0
    assert loadgen.percentile(vals, 90) == pytest.approx(4.6)
    assert loadgen.percentile(vals, 0) == 1.0 and loadgen.percentile(vals, 100) == 5.0
    assert loadgen.percentile([], 50) is None


def _rec(i, ttft, e2e, n, status="OK"):
    return RequestRecord(i, 10, n, status=status, ttft_s=ttft, e2e_s=e2e, output_tokens=n,
                         itl_s=[(e2e - ttft) / (n - 1)] * (n - 1) if n > 1 else [])


def test_goodput_counts_only_requests_meeting_both_slos():
    recs = [
        _rec(0, 0.1, 1.0, 10),  # TPOT 0.1 -> good
        _rec(1, 0.5, 1.4, 10),  # TTFT 0.5 > 0.3 -> misses
        _rec(2, 0.1, 3.1, 11),  # TPOT 0.3 > 0.2 -> misses
        _rec(3, 0.2, 0.2, 1),   # one token: no TPOT, TTFT ok -> good
        RequestRecord(4, 10, 5, status="RESOURCE_EXHAUSTED"),
    ]
    s = loadgen.summarize(recs, duration_s=2.0, rate=4.0, slo_ttft_s=0.3, slo_tpot_s=0.2)
    assert s["requests"] == 5 and s["ok"] == 4 and s["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["slo_attainment"] == pytest.approx(2 / 5) and s["goodput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx((10 + 10 + 11 + 1) / 2.0)
    assert s["tpot_s"]["p50"] == pytest.approx(0.1)
    table = loadgen.format_table([s])
    assert "40.0%" in table and "RESOURCE" not in table
    summaries = [{"rate": 1.0, "slo_attainment": 1.0}, {"rate": 2.0, "slo_attainment": 0.95},
                 {"rate": 4.0, "slo_attainment": 0.5}, {"rate": "inf", "slo_attainment": 1.0}]
    assert loadgen.max_rate_meeting(summaries) == 2.0
    assert loadgen.max_rate_meeting(summaries[2:3]) is None


@pytest.mark.parametrize("text", ["0", "abc", "-1", "nan"])
def test_bad_rates_rejected(text):
    with pytest.raises(CLIError, match="--rate"):
        loadgen.parse_rates(text)


@pytest.mark.parametrize("text", ["0", "9:3", "x", "1:2:3"])
def test_bad_ranges_rejected(text):
    with pytest.raises(CLIError, match="--prompt-len"):
        loadgen.parse_range(text, "prompt-len")


def test_cli_reports_bad_arguments_with_exit_2(capsys):
    assert main(["bench", "--rate", "fast"]) == 2
    assert "--rate" in capsys.readouterr().err
    assert main(["bench", "--prompt-len", "5:1"]) == 2
    assert "--prompt-len" in capsys.readouterr().err


def test_disagg_rescore_applies_new_slos_to_saved_records():
    from dataclasses import asdict

    from bench.disagg import rescore

    recs = [_rec(0, 0.1, 1.0, 10), _rec(1, 0.1, 2.0, 10)]  # TPOT 0.1 and 0.211
    saved = [{"setup": "x", "runs": [{"summary": loadgen.summarize(recs, 2.0, 4.0, 1.0, 1.0),
                                      "records": [asdict(r) for r in recs]}]}]
    assert saved[0]["runs"][0]["summary"]["slo_attainment"] == 1.0
    out = rescore(saved, slo_ttft_s=1.0, slo_tpot_s=0.15)
    assert out[0]["runs"][0]["summary"]["slo_attainment"] == 0.5
    assert out[0]["max_rate_at_90pct_slo"] is None
    assert rescore(saved, 1.0, 0.5)[0]["max_rate_at_90pct_slo"] == 4.0
