"""How fast a burst of prompts joins the decode batch: the gap between each request's first
token (from the prefill worker) and its second (the decode worker's first step with it).

    python bench/burst_admission.py [--burst 16] [--rounds 3] [--max-tokens 12] [--transport gloo]

Starts the 1P1D CPU cluster (int8 KV, decode worker on 1 thread, as in bench/serve_cpu.py),
sends `--burst` streaming requests at once, `--rounds` times, and prints p50/p90/max of the
first-to-second-token gap, TTFT and the time to the last token, all client-side.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_cpu import PROMPTS, pct  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--transport", default="gloo", choices=["gloo", "grpc"])
    args = ap.parse_args(argv)
    if args.burst < 1 or args.rounds < 1 or args.max_tokens < 2:
        ap.error("--burst and --rounds must be >= 1, --max-tokens >= 2")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from cluster.background import BackgroundCluster
    from cluster.client import build_request
    from cluster.config import parse_config
    from engine.loader.registry import load_tokenizer

    cfg = parse_config({"kv_dtype": "int8", "transport": args.transport, "router": {"port": 0},
                        "prefill": {"num_pages": 1024},
                        "decode": {"num_pages": 2048, "torch_threads": 1}}, "bench")
    print("[bench] starting the 1P1D cluster", file=sys.stderr)
    c = BackgroundCluster(cfg, quiet=True)

    def stream(ids: list[int]) -> list[float]:
        t0, times = time.perf_counter(), []
        req = build_request(token_ids=ids, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for _ in c.stub.Generate(req, timeout=300):
            times.append(time.perf_counter() - t0)
        return times

    try:
        tok = load_tokenizer("smollm2-135m")[0]
        prompts = [tok.encode(p) for p in PROMPTS]
        stream(prompts[0])  # warm-up: builds the pairwise group
        gaps, ttft, last = [], [], []
        with cf.ThreadPoolExecutor(args.burst) as pool:
            for _ in range(args.rounds):
                for t in pool.map(stream, [prompts[i % len(prompts)] for i in range(args.burst)]):
                    gaps.append(t[1] - t[0])
                    ttft.append(t[0])
                    last.append(t[-1])
    finally:
        c.close()
    row = {"bench": "burst_admission", "burst": args.burst, "rounds": args.rounds, "transport": args.transport,
           **{f"{name}_{q}_ms": 1e3 * (max(xs) if q == "max" else pct(xs, {"p50": 0.5, "p90": 0.9}[q]))
              for name, xs in (("gap2", gaps), ("ttft", ttft), ("last", last)) for q in ("p50", "p90", "max")}}
    print(json.dumps(row))
    print(f"\nburst of {args.burst} x {args.rounds} rounds, {args.max_tokens} tokens each, {args.transport}")
    for name in ("gap2", "ttft", "last"):
        print(f"{name:5s} p50 {row[name + '_p50_ms']:7.0f} ms   p90 {row[name + '_p90_ms']:7.0f} ms   "
              f"max {row[name + '_max_ms']:7.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
