"""Where a replayed step's time goes, kernel by kernel, from a torch profiler trace.

`trace_kernels(fn, steps)` runs fn `steps` times under the profiler and returns the GPU
kernel events of its chrome trace (name, start, duration, grid, registers, occupancy).
`step_table(events, steps)` groups the kernels of identical steps into rows.

Under programmatic dependent launch (PDL) a kernel starts while the one before it still
runs and waits inside, so its duration counts time spent waiting, and the durations of a
step add up to more than the step. What each kernel adds to the step is the time from the
latest end before it to its own end ("adds"), which sums to the step's span exactly. A
kernel (not a step) is told apart by name, grid, registers and the kernel before it, so
the same GEMV kernel as qkv, o, gate_up and down shows as four rows. Tracing may itself
change how kernels overlap, so the steps' times come from untraced replays (bench/gemv.py
traces after all its timings).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence

import torch


def profile_calls(fn: Callable[[], object], steps: int):
    """A finished torch profile (CUDA activity) of `steps` calls of fn, after one untraced
    call (the first call after the profiler starts may carry its set-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof


def trace_kernels(fn: Callable[[], object], steps: int) -> list[dict]:
    """The GPU kernel events of `steps` calls of fn (each its own step), in start order."""
    prof = profile_calls(fn, steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return kernel_events(trace)


def kernel_events(trace: dict) -> list[dict]:
    """A chrome trace's kernel events as {name, ts, dur (us), grid, regs, occupancy}, in start
    order (the fields the profiler left out are None; records without a start time, which
    the profiler sometimes leaves, are dropped)."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("cat") != "kernel" or e.get("ph") != "X" or not e.get("ts"):
            continue
        args = e.get("args", {})
        grid = args.get("grid")
        out.append({"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]),
                    "grid": tuple(grid) if grid else None, "regs": args.get("registers per thread"),
                    "occupancy": args.get("est. achieved occupancy %")})
    out.sort(key=lambda e: e["ts"])
    return out


def short_name(name: str, width: int = 36) -> str:
    """A kernel's name without its return type and template or argument lists, cut to width."""
    if name.startswith("void "):
        name = name[5:]
    for cut in ("<", "("):
        name = name.split(cut, 1)[0]
    return name if len(name) <= width else name[: width - 3] + "..."


def _grid(grid) -> str:
    if grid is None:
        return "?"
    return "x".join(str(v) for v in grid[:3] if v != 1) or "1"


def step_table(events: Sequence[dict], steps: int) -> tuple[list[list], dict]:
    """Rows for the kernels of `steps` identical steps (one kernel a row key: name, grid,
    registers and the kernel before it), by time added to the step, most first:
    [kernel, grid, regs, occupancy %, after, a step, median us, median adds us, adds a step us];
    and a summary: kernels a step, their durations' sum, the span (first start to last end)
    and how much of the span no kernel ran, medians over the steps, in us.
    Raises ValueError when the events do not split into `steps` equal steps."""
    if steps < 1 or not events or len(events) % steps:
        raise ValueError(f"{len(events)} kernel events do not split into {steps} equal steps")
    per = len(events) // steps
    names = [[short_name(e["name"]) for e in events[i * per:(i + 1) * per]] for i in range(steps)]
    if any(n != names[0] for n in names):
        raise ValueError("the steps did not launch the same kernels in the same order")
    groups: dict[tuple, dict] = {}
    spans, sums, idle = [], [], []
    for i in range(steps):
        step = events[i * per:(i + 1) * per]
        first = step[0]["ts"]
        latest = first  # the latest end so far: what the next kernel's end adds to
        covered, reach = 0.0, first  # the union of the kernels' intervals
        for j, e in enumerate(step):
            end = e["ts"] + e["dur"]
            adds = max(end - latest, 0.0)
            latest = max(latest, end)
            covered += max(end - max(e["ts"], reach), 0.0)
            reach = max(reach, end)
            before = short_name(step[j - 1]["name"], 24) if j else "-"
            key = (names[0][j], e["grid"], e["regs"], before)
            g = groups.setdefault(key, {"durs": [], "adds": [], "occ": e["occupancy"]})
            g["durs"].append(e["dur"])
            g["adds"].append(adds)
        spans.append(latest - first)
        sums.append(sum(e["dur"] for e in step))
        idle.append(latest - first - covered)
    rows = []
    for (name, grid, regs, before), g in groups.items():
        count = len(g["durs"]) // steps
        rows.append([name, _grid(grid), regs if regs is not None else "?",
                     g["occ"] if g["occ"] is not None else "?", before, count,
                     round(statistics.median(g["durs"]), 2), round(statistics.median(g["adds"]), 2),
                     round(sum(g["adds"]) / steps, 1)])
    rows.sort(key=lambda r: r[-1], reverse=True)
    summary = {"kernels": per, "durations_us": round(statistics.median(sums), 1),
               "span_us": round(statistics.median(spans), 1), "idle_us": round(statistics.median(idle), 1)}
    return rows, summary


TABLE_HEADERS = ["kernel", "grid", "regs", "occ %", "after", "a step", "us", "adds us", "adds a step"]


def print_step_table(label: str, events: Sequence[dict], steps: int, top: int = 16) -> None:
    """step_table's rows (the `top` that add most) under a one-line summary; a line saying
    why instead where the steps differ."""
    from bench.common import format_table

    try:
        rows, s = step_table(events, steps)
    except ValueError as err:  # e.g. a side stream's kernels interleaved differently each step
        print(f"# {label}: no kernel table: {err}", flush=True)
        return
    print(f"# {label}: {s['kernels']} kernels a step, span {s['span_us']:.1f} us, kernel durations "
          f"{s['durations_us']:.1f} us, no kernel running {s['idle_us']:.1f} us (medians of {steps})")
    print(format_table(TABLE_HEADERS, rows[:top]), flush=True)
