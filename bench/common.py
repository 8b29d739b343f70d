"""Helpers shared by the benchmark scripts: JSON lines, the final table, progress, machine facts.

Every script prints one JSON line per measurement to stdout, then a plain table last.
Progress goes to stderr so that stdout stays machine-readable up to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import torch


class JsonLines:
    """Writes each record to stdout and, when a path is given, to that file too."""

    def __init__(self, path: str | None = None) -> None:
        self._file: IO[str] | None = open(path, "w") if path else None

    def emit(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=False)
        print(line, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Fastest of `repeats` calls: on a shared machine the minimum is the least disturbed run."""
    runs = [timed(fn) for _ in range(max(1, repeats))]
    return min(runs, key=lambda r: r[0])


class CpuMonitor:
    """CPU time spent by this process and by everything else on the machine over a block.

    On a shared machine another job on the same cores makes every timing meaningless
    (torch's OpenMP threads spin while they wait for a core), so each measurement
    carries how many cores other processes kept busy while it ran.
    """

    def __enter__(self) -> CpuMonitor:
        self._wall, self._own, self._stat = time.perf_counter(), time.process_time(), _cpu_stat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.own_cpu_s = time.process_time() - self._own
        stat = _cpu_stat()
        self.other_cores = self.steal_cores = None
        if stat is not None and self._stat is not None:
            busy, steal = (stat[i] - self._stat[i] for i in range(2))
            self.other_cores = max(0.0, busy - self.own_cpu_s) / self.wall_s
            # Steal: time the hypervisor gave our vCPUs to another guest.
            self.steal_cores = steal / self.wall_s

    @property
    def own_share(self) -> float:
        """Own CPU time / (wall * torch threads): near 1.0 when our threads had the cores."""
        return self.own_cpu_s / (self.wall_s * torch.get_num_threads())


def _cpu_stat() -> tuple[float, float] | None:
    """Machine-wide (non-idle, steal) CPU seconds since boot from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare a result: CPU, cores, torch, threads, current load."""
    return {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_1m": _loadavg(),
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain `a | b | c` table, columns right-aligned, with a dashed rule under the header."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def attention_tune_parser(doc: str, batch: int, length_flag: str, length: int,
                          kv_heads: int) -> argparse.ArgumentParser:
    """The shared part of the attention sweeps' command lines: the problem's shape, and
    `--json-out` for the rows."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument(length_flag, type=int, default=length)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--json-out", default="")
    return ap


def ints(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]: a sweep axis from the command line."""
    return [int(x) for x in text.split(",") if x]


def write_json_rows(path: str, rows: Sequence[dict]) -> None:
    """One JSON object a line; nothing when path is empty."""
    if path:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
