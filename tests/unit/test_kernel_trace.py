"""bench/kernel_trace.py: a step's kernels from a chrome trace, on made-up traces."""

import pytest

from bench.kernel_trace import kernel_events, short_name, step_table


def _kernel(name, ts, dur, grid=(1, 1, 1), regs=32, occ=50):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"grid": list(grid), "registers per thread": regs, "est. achieved occupancy %": occ}}


def _step(t0, gemv_late=0.0):
    """norm, then the GEMV twice (two layers' worth, the second after the first), the second
    GEMV started early (as under PDL) and so overlapping the first."""
    return [
        _kernel("void rmsnorm_kernel<float>(float*)", t0, 2.0),
        _kernel("_gemv_kernel", t0 + 3.0, 10.0, grid=(1536, 1, 1), regs=124),
        _kernel("_gemv_kernel", t0 + 11.0, 8.0 + gemv_late, grid=(1024, 1, 1), regs=124),
    ]


def test_steps_group_by_kernel_and_what_ran_before():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 5.0},
        _kernel("_gemv_kernel", 0, 3.0),  # no start time: left out
        *_step(100.0), *_step(200.0, gemv_late=2.0), *_step(300.0),
    ]}
    events = kernel_events(trace)
    assert [e["name"] for e in events[:3]] == ["void rmsnorm_kernel<float>(float*)", "_gemv_kernel",
                                              "_gemv_kernel"]  # the runtime call, the record
    # without a start left out
    rows, summary = step_table(events, 3)
    assert summary["kernels"] == 3
    # span: first start to last end, 19 us (the middle step 21); the medians
    assert summary["span_us"] == 19.0
    assert summary["durations_us"] == 20.0  # overlapping durations add up past the span
    assert summary["idle_us"] == 1.0  # 2..3 us: no kernel ran
    by_grid = {r[1]: r for r in rows}
    assert set(by_grid) == {"1", "1536", "1024"}
    second = by_grid["1024"]
    assert second[4] == "_gemv_kernel" and by_grid["1536"][4] == "rmsnorm_kernel"
    # the second GEMV ends 6 us after the first: what it adds, not its 8 us
    assert second[6] == 8.0 and second[7] == 6.0
    assert second[8] == pytest.approx((6 + 8 + 6) / 3, abs=0.05)
    # what every kernel adds sums to the span, step by step
    assert sum(r[8] for r in rows) == pytest.approx((19 + 21 + 19) / 3, abs=0.1)
    assert rows[0][1] == "1536"  # most added first (10 us a step)


def test_steps_that_differ_are_refused():
    events = kernel_events({"traceEvents": _step(10.0) + _step(60.0)[:2]})
    with pytest.raises(ValueError, match="equal steps"):
        step_table(events, 2)
    other = _step(60.0)
    other[1]["name"] = "nvjet_tst_128x8"
    events = kernel_events({"traceEvents": _step(10.0) + other})
    with pytest.raises(ValueError, match="same kernels"):
        step_table(events, 2)


def test_short_names():
    assert short_name("void at::native::vectorized_elementwise_kernel<4, Fn>(int, Fn)") == \
        "at::native::vectorized_elementwis..."
    assert short_name("_gemv_kernel") == "_gemv_kernel"
    assert short_name("void f(int)") == "f"


def test_printed_table_and_steps_that_differ(capsys):
    from bench.kernel_trace import print_step_table

    print_step_table("two steps", kernel_events({"traceEvents": _step(10.0) + _step(60.0)}), 2)
    out = capsys.readouterr().out
    assert out.startswith("# two steps: 3 kernels a step, span 19.0 us")
    assert "_gemv_kernel" in out and "1536" in out
    print_step_table("cut", kernel_events({"traceEvents": _step(10.0)}), 2)
    assert capsys.readouterr().out.startswith("# cut: no kernel table: 3 kernel events")
