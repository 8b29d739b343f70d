"""Disaggregated 1P1D vs colocated replicas on the same GPUs, same model, same workload.

For each setup the script starts a real cluster (Ray actors, gRPC router; NCCL KV
transfer for 1P1D), then:
- TTFT probe: sequential requests with a fixed long prompt (default 4096 tokens), one at
  a time, 2 output tokens: TTFT and the second token's latency (which, in 1P1D, waits for
  the KV transfer) as the client sees them;
- load sweep: `miniinfer bench`'s Poisson generator (cluster/loadgen.py) at each rate,
  reporting SLO attainment and goodput (requests/s meeting both the TTFT and TPOT SLO).
It prints JSON lines, then the tables, and writes bench.json + goodput/latency plots.

    python bench/disagg.py --model DIR [--dummy-weights] [--mix summarize] [--rates 2,4,8]
        [--setups 1p1d,colocated2] [--slo-ttft-ms 2000 --slo-tpot-ms 30] [--out DIR]
    python bench/disagg.py --model X --from-json OUT/disagg.json --slo-tpot-ms 10   # re-score

On CPU (smoke test): --device cpu --setups 1p1d,colocated1 --mix tiny.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JsonLines, format_table, progress
from cluster import loadgen
from cluster.background import BackgroundCluster
from cluster.config import parse_config

SETUPS = {
    # name: (mode, prefill replicas, decode replicas)
    "1p1d": ("disaggregated", 1, 1),
    "colocated1": ("colocated", 0, 1),
    "colocated2": ("colocated", 0, 2),
    "2p2d": ("disaggregated", 2, 2),  # four GPUs
    "colocated4": ("colocated", 0, 4),
}


def setup_config(args, name: str):
    mode, n_prefill, n_decode = SETUPS[name]
    gpu = args.device == "cuda"
    pool = {"gpus_per_worker": 1} if gpu else {"cpus_per_worker": 0.5, "torch_threads": args.cpu_threads}
    data = {
        "model": args.model, "dummy_weights": args.dummy_weights, "dtype": "bf16" if gpu else "fp32",
        "kv_dtype": args.kv_dtype, "device": args.device, "mode": mode,
        "transport": "nccl" if gpu else "gloo",  # unused by colocated workers
        "router": {"host": "127.0.0.1", "port": 0},
        "prefill": {**pool, "replicas": n_prefill, "num_pages": args.prefill_pages,
                    "max_num_batched_tokens": args.max_batched_tokens},
        "decode": {**pool, "replicas": n_decode, "num_pages": args.decode_pages, "max_num_seqs": 256,
                   "max_num_batched_tokens": args.max_batched_tokens},
        "limits": {"max_prompt_tokens": 16384, "max_tokens": 4096, "request_timeout_s": args.timeout,
                   "transfer_timeout_s": 60},
    }
    return parse_config(data, f"setup {name}")


def ttft_probe(address: str, prompt_len: int, n: int, seed: int) -> dict:
    """n sequential requests (fixed prompt length, 2 output tokens): TTFT and 2nd-token latency."""
    specs = loadgen.make_workload(n, float("inf"), (prompt_len, prompt_len), (2, 2), (100, 10000), seed)
    ttft, second = [], []
    for s in specs:
        s.arrival_s = 0.0
        recs, _ = asyncio.run(loadgen.run_rate(address, [s], timeout_s=300))
        r = recs[0]
        if not r.ok:
            raise RuntimeError(f"TTFT probe request failed: {r.status} {r.detail}")
        ttft.append(r.ttft_s)
        second.append(r.e2e_s - r.ttft_s)
    return {"prompt_len": prompt_len, "n": n, "ttft_s_median": statistics.median(ttft),
            "ttft_s_min": min(ttft), "second_token_s_median": statistics.median(second)}


def run_setup(args, name: str, out: JsonLines) -> dict:
    cfg = setup_config(args, name)
    progress(f"{name}: starting the cluster ({cfg.mode}, {cfg.prefill.replicas}P {cfg.decode.replicas}D)")
    t0 = time.monotonic()
    cluster = BackgroundCluster(cfg, quiet=not args.verbose)
    try:
        start_s = time.monotonic() - t0
        progress(f"{name}: ready in {start_s:.1f}s; warm-up")
        warm = loadgen.make_workload(4, float("inf"), (64, 64), (4, 4), (100, 10000), seed=99)
        asyncio.run(loadgen.run_rate(cluster.address, warm, timeout_s=300))
        probe = ttft_probe(cluster.address, args.probe_len, args.probe_n, seed=7)
        out.emit({"setup": name, "section": "ttft_probe", **probe})
        mix = loadgen.MIXES[args.mix]
        runs = []
        for i, rate in enumerate(args.rates):
            specs = loadgen.make_workload(args.num_requests, rate, mix["prompt"], mix["output"], (100, 10000),
                                          seed=args.seed + i)
            progress(f"{name}: rate {rate:g} req/s ({len(specs)} requests, mix {args.mix})")
            recs, dur = asyncio.run(loadgen.run_rate(cluster.address, specs, args.timeout))
            s = loadgen.summarize(recs, dur, rate, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
            out.emit({"setup": name, "section": "load", **s})
            runs.append({"summary": s, "records": [asdict(r) for r in recs]})
        cluster.wait_pools_full(timeout=60)
        return {"setup": name, "start_s": start_s, "probe": probe, "runs": runs,
                "max_rate_at_90pct_slo": loadgen.max_rate_meeting([r["summary"] for r in runs])}
    finally:
        cluster.close()
        _shutdown_ray()


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def rescore(results: list[dict], slo_ttft_s: float, slo_tpot_s: float) -> list[dict]:
    """The saved per-request records of each run, summarized again against other SLOs."""
    for res in results:
        for run in res["runs"]:
            recs = [loadgen.RequestRecord(**r) for r in run["records"]]
            s = run["summary"]
            rate = float("inf") if s["rate"] == "inf" else s["rate"]
            run["summary"] = loadgen.summarize(recs, s["duration_s"], rate, slo_ttft_s, slo_tpot_s)
        res["max_rate_at_90pct_slo"] = loadgen.max_rate_meeting([r["summary"] for r in res["runs"]])
    return results


def plot(out_dir: Path, results: list[dict], slo_ttft_s: float, slo_tpot_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        s = [r["summary"] for r in res["runs"]]
        axes[0].plot([x["rate"] for x in s], [x["goodput"] for x in s], marker="o", label=res["setup"])
        axes[1].plot([x["rate"] for x in s], [100 * x["slo_attainment"] for x in s], marker="o", label=res["setup"])
    axes[0].set_ylabel("goodput (req/s)")
    axes[1].set_ylabel("SLO attainment (%)")
    axes[1].axhline(90, color="gray", linestyle="--", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    loadgen.save_figure(fig, out_dir / "disagg_goodput.png")
    for res in results:
        loadgen.write_plots(out_dir, res["runs"], slo_ttft_s, slo_tpot_s, tag=f"_{res['setup']}", goodput=False)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The options setup_config reads (model and pools), shared with bench/scale_out.py."""
    p.add_argument("--model", required=True, help="alias, .gguf or a folder with config.json + tokenizer")
    p.add_argument("--dummy-weights", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--kv-dtype", default="int8")
    p.add_argument("--prefill-pages", type=int, default=16384)
    p.add_argument("--decode-pages", type=int, default=32768)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, s")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_args(p)
    p.add_argument("--setups", default="1p1d,colocated2")
    p.add_argument("--mix", default="summarize", choices=sorted(loadgen.MIXES))
    p.add_argument("--rates", default="2,4,8")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=30.0)
    p.add_argument("--probe-len", type=int, default=4096)
    p.add_argument("--probe-n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--from-json", default=None, help="re-score a saved disagg.json with the SLOs given")
    args = p.parse_args(argv)
    args.rates = loadgen.parse_rates(args.rates)
    if args.from_json:  # re-score saved records against other SLOs, no cluster
        results = rescore(json.loads(Path(args.from_json).read_text())["results"],
                          args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    else:
        setups = args.setups.split(",")
        for s in setups:
            if s not in SETUPS:
                p.error(f"--setups: unknown setup {s!r} (known: {', '.join(SETUPS)})")
        out = JsonLines(os.environ.get("DISAGG_JSON"))
        results = [run_setup(args, s, out) for s in setups]

    print(format_table(
        ["setup", "prompt", "TTFT median ms", "TTFT min ms", "2nd token ms"],
        [[r["setup"], r["probe"]["prompt_len"], f"{r['probe']['ttft_s_median'] * 1e3:.1f}",
          f"{r['probe']['ttft_s_min'] * 1e3:.1f}", f"{r['probe']['second_token_s_median'] * 1e3:.1f}"]
         for r in results]))
    print()
    for r in results:
        print(f"== {r['setup']} (ready in {r['start_s']:.0f}s; highest rate with >= 90% SLO: "
              f"{r['max_rate_at_90pct_slo']})")
        print(loadgen.format_table([x["summary"] for x in r["runs"]]))
    print(f"mix {args.mix}; SLO: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms")
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "disagg.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                   "results": results}, indent=1, default=str))
        try:
            plot(d, results, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        except ImportError:
            progress("matplotlib not installed: no plots")
    return results


if __name__ == "__main__":
    main()
