"""A live `miniinfer apply` from 1P1D to 2P2D while `miniinfer bench` load runs.

Starts the 1P1D cluster of bench/disagg.py (same model and pool settings), sends one long
Poisson run (cluster/loadgen.py) at a fixed rate, and after --apply-at seconds runs the CLI
as a user would: `miniinfer apply -c 2p2d.yaml --address ... --wait`. Meanwhile it polls
`GetClusterStatus`; at the end it reads each worker's engine step count, to show the new
workers took requests. It reports failed requests (the
target is none), how long the new workers took to be READY, and latency and throughput
for requests sent before the apply, while it settled, and after. Exit status 1 if any
request failed or the cluster did not settle.

    python bench/scale_out.py --model DIR --dummy-weights [--rate 8 --duration 90 --apply-at 10]
    python bench/scale_out.py --model smollm2-135m --device cpu --mix tiny --rate 2 --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from bench import disagg  # noqa: E402
from bench.common import progress  # noqa: E402
from cluster import loadgen  # noqa: E402
from cluster.background import BackgroundCluster  # noqa: E402


class Watch:
    """Polls cluster status in a thread: per worker, the most requests it held at once."""

    def __init__(self, cluster: BackgroundCluster, period_s: float = 0.5) -> None:
        self.cluster, self.period_s = cluster, period_s
        self.busiest: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            try:
                st = self.cluster.status()
            except Exception:  # noqa: BLE001 - a missed sample is fine
                continue
            for p in st.pools:
                for w in p.workers:
                    key = f"{p.name}/{w.worker_id}"
                    held = w.running + w.waiting
                    self.busiest[key] = max(self.busiest.get(key, 0), held)

    def close(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join(5)
        return dict(self.busiest)


def windows(records, t_apply: float, t_settled: float, end: float, args) -> list[tuple[str, dict]]:
    """Records grouped by when they were sent, each group summarized over its window (the last
    window runs to the last completion, so its req/s includes the drain after the last send)."""
    spans = [("before apply", 0.0, t_apply), ("while scaling", t_apply, t_settled), ("after (2P2D)", t_settled, end)]
    out = []
    for name, lo, hi in spans:
        group = [r for r in records if lo <= r.sent_s < hi]
        s = loadgen.summarize(group, hi - lo, args.rate, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        out.append((name, s))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    disagg.add_cluster_args(p)  # model and pools, as bench/disagg.py's setups use them
    p.add_argument("--mix", default="summarize", choices=sorted(loadgen.MIXES))
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, req/s")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals")
    p.add_argument("--apply-at", type=float, default=10.0, help="seconds into the load to apply 2P2D")
    p.add_argument("--settle-timeout", type=float, default=300.0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write scale_out.json (records, windows, events) here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.apply_at < args.duration:
        p.error("--apply-at must fall inside --duration")

    small, big = disagg.setup_config(args, "1p1d"), disagg.setup_config(args, "2p2d")
    mix = loadgen.MIXES[args.mix]
    n = max(1, round(args.rate * args.duration))
    specs = loadgen.make_workload(n, args.rate, mix["prompt"], mix["output"], (100, 10000), seed=args.seed)
    progress(f"starting 1P1D ({args.device}); then {n} requests at {args.rate:g} req/s, apply 2P2D at "
             f"{args.apply_at:g}s")
    t0 = time.monotonic()
    cluster = BackgroundCluster(small, quiet=not args.verbose)
    result: dict = {}
    try:
        progress(f"1P1D ready in {time.monotonic() - t0:.1f}s; warm-up")
        warm = loadgen.make_workload(4, float("inf"), (64, 64), (4, 4), (100, 10000), seed=99)
        asyncio.run(loadgen.run_rate(cluster.address, warm, timeout_s=300))
        watch = Watch(cluster)
        done: dict = {}

        def send_load() -> None:
            done["records"], done["duration"] = asyncio.run(loadgen.run_rate(cluster.address, specs, args.timeout))

        load = threading.Thread(target=send_load, daemon=True)
        start = time.monotonic()
        load.start()
        time.sleep(args.apply_at)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "2p2d.yaml"
            path.write_text(yaml.safe_dump(big.model_dump()))
            t_apply = time.monotonic() - start
            progress(f"t={t_apply:.1f}s: miniinfer apply -c 2p2d.yaml --wait {args.settle_timeout:g}")
            cli = subprocess.run([sys.executable, "-m", "cluster.cli", "apply", "-c", str(path), "--address",
                                  cluster.address, "--wait", str(args.settle_timeout)],
                                 capture_output=True, text=True, timeout=args.settle_timeout + 60)
        t_settled = time.monotonic() - start
        progress(f"t={t_settled:.1f}s: apply exited {cli.returncode}: {cli.stdout.strip()} {cli.stderr.strip()}")
        load.join(args.duration + args.timeout + 60)
        busiest = watch.close()
        if "records" not in done:
            raise RuntimeError("the load generator did not finish")
        records, end = done["records"], done["duration"]
        st = cluster.status()
        ready_s = {w.worker_id: w.warmup_s for p_ in st.pools for w in p_.workers}
        cluster.wait_pools_full(timeout=60)
        # engine steps per worker since it started (the status the router last polled)
        steps = {f"{w.role}/{w.worker_id}": w.status.get("steps", 0)
                 for w in list(cluster.cluster.table.workers.values())}
        failed = [r for r in records if not r.ok]
        parts = windows(records, t_apply, t_settled, end, args)
        result = {"args": vars(args), "apply_rc": cli.returncode, "apply_stdout": cli.stdout,
                  "apply_stderr": cli.stderr, "t_apply_s": t_apply, "t_settled_s": t_settled,
                  "failed": len(failed), "requests": len(records), "busiest": busiest, "steps": steps, "warmup_s": ready_s,
                  "events": list(st.events), "windows": dict(parts),
                  "overall": loadgen.summarize(records, end, args.rate, args.slo_ttft_ms / 1e3,
                                               args.slo_tpot_ms / 1e3),
                  "records": [asdict(r) for r in records]}
    finally:
        cluster.close()
        disagg._shutdown_ray()

    print(f"apply at t={result['t_apply_s']:.1f}s; the CLI (apply --wait) returned {result['apply_rc']} at "
          f"t={result['t_settled_s']:.1f}s (its start-up and 0.5 s polls included); "
          f"{result['requests']} requests, {result['failed']} failed")
    print("worker start-up inside the actor, s (model + warm-up; the controller's events below also "
          "count the actor's creation): " + ", ".join(f"{k} {v:.1f}" for k, v in result["warmup_s"].items()))
    print("engine steps: " + ", ".join(f"{k} {v}" for k, v in sorted(result["steps"].items())))
    print("most requests held at once: " + ", ".join(f"{k} {v}" for k, v in sorted(result["busiest"].items())))
    table = loadgen.format_table([s for _, s in parts]).splitlines()
    print(f"{'sent':>14}  {table[0]}")
    for (name, _), line in zip(parts, table[1:]):
        print(f"{name:>14}  {line}")
    for e in result["events"][-12:]:
        print(f"event {e}")
    if result["failed"]:
        errors = {r.status for r in records if not r.ok}
        print(f"FAILED requests: {result['failed']} ({', '.join(sorted(errors))})")
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "scale_out.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["failed"] == 0 and result["apply_rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
