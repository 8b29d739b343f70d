"""TTFT / TPOT / tokens/s of the 1P1D cluster vs the local engine, same prompts, one run.

    python bench/serve_cpu.py [--batch-sizes 1,16] [--max-tokens 48] [--kv-dtype int8]

The local engine runs in this process (single-process continuous batching: the
"colocated" baseline); the cluster runs 1 prefill + 1 decode worker on a local Ray over
gloo. They run one after the other, never at the same time. JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def quicksort(xs):",
    "Explain photosynthesis in simple terms.",
    "List five European rivers:",
    "Once upon a time, a robot",
    "The three laws of thermodynamics are",
    "How do I make a cup of tea?",
]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(
    name: str, batch: int, ttft: list[float], tpot: list[float], tokens: int, wall: float
) -> dict:
    return {
        "system": name,
        "batch": batch,
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
        "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
        "tpot_p50_ms": 1e3 * pct(tpot, 0.5),
        "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
        "tok_s": tokens / wall,
        "requests": len(ttft),
    }


def merge(name: str, batch: int, rounds: list[dict]) -> dict:
    """Median over rounds of each figure."""
    keys = [k for k in rounds[0] if k.endswith("_ms") or k == "tok_s"]
    out = {
        "system": name,
        "batch": batch,
        "requests": sum(r["requests"] for r in rounds),
        "rounds": len(rounds),
    }
    out.update({k: statistics.median(r[k] for r in rounds) for k in keys})
    return out


def run_local(engine, prompts: list[list[int]], batch: int, max_tokens: int, rounds: int) -> dict:
    """Per-request TTFT = time to its first token; TPOT = mean gap between its later tokens."""
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ttft, tpot, tokens, wall = [], [], 0, 0.0
    for r in range(rounds):
        group = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
        t0 = time.perf_counter()
        ids = [engine.add_request(p, params) for p in group]
        first, last, count = {}, {}, {i: 0 for i in ids}
        while engine.has_unfinished():
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                count[o.request_id] += len(o.new_token_ids)
        wall += time.perf_counter() - t0
        for i in ids:
            ttft.append(first[i] - t0)
            tpot.append((last[i] - first[i]) / max(1, count[i] - 1))
            tokens += count[i]
    return summarize("local", batch, ttft, tpot, tokens, wall)


def one_stream(stub, prompt_ids: list[int], max_tokens: int) -> tuple[float, float, int]:
    from cluster.client import build_request

    req = build_request(
        token_ids=prompt_ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    )
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for msg in stub.Generate(req, timeout=300):
        now = time.perf_counter()
        first = first or now
        last = now
        n += len(msg.token_ids)
    return first - t0, (last - first) / max(1, n - 1), n


def run_cluster(stub, prompts: list[list[int]], batch: int, max_tokens: int, rounds: int) -> dict:
    ttft, tpot, tokens, wall = [], [], 0, 0.0
    with cf.ThreadPoolExecutor(batch) as pool:
        for r in range(rounds):
            group = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
            t0 = time.perf_counter()
            results = [
                f.result(timeout=600)
                for f in [pool.submit(one_stream, stub, p, max_tokens) for p in group]
            ]
            wall += time.perf_counter() - t0
            for a, b, n in results:
                ttft.append(a)
                tpot.append(b)
                tokens += n
    return summarize("cluster-1p1d", batch, ttft, tpot, tokens, wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size")
    ap.add_argument(
        "--decode-threads",
        type=int,
        default=1,
        help="decode worker torch threads (on 2 cores, 1 leaves a core to the router)",
    )
    ap.add_argument("--kv-dtype", default="int8")
    ap.add_argument("--transport", default="gloo", choices=["gloo", "grpc"])
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    from cluster.background import BackgroundCluster
    from cluster.config import parse_config
    from engine.llm import EngineConfig, LLMEngine

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    print(
        f"[bench] starting the 1P1D cluster (decode worker: {args.decode_threads} torch threads)",
        file=sys.stderr,
    )
    cfg = parse_config(
        {
            "kv_dtype": args.kv_dtype,
            "transport": args.transport,
            "router": {"port": 0},
            "prefill": {"num_pages": 1024},
            "decode": {"num_pages": 2048, "torch_threads": args.decode_threads},
        },
        "bench",
    )
    c = BackgroundCluster(cfg, quiet=False)
    rows = []
    try:
        print(
            f"[bench] local engine (kv {args.kv_dtype}, {torch.get_num_threads()} threads)",
            file=sys.stderr,
        )
        engine = LLMEngine.from_name(
            "smollm2-135m", EngineConfig(kv_dtype=args.kv_dtype, num_pages=1024), quiet=True
        )
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        run_local(
            engine, prompts, 1, 8, 1
        )  # warm-ups (the cluster's also builds the pairwise group)
        run_cluster(c.stub, prompts, 1, 8, 1)
        for b in batches:
            # Alternate rounds so drift in this shared machine's speed hits both sides alike.
            local, cluster = [], []
            for r in range(args.rounds):
                local.append(run_local(engine, prompts[r:] + prompts[:r], b, args.max_tokens, 1))
                cluster.append(
                    run_cluster(c.stub, prompts[r:] + prompts[:r], b, args.max_tokens, 1)
                )
            for name, rs in (("local", local), ("cluster-1p1d", cluster)):
                rows.append(merge(name, b, rs))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        c.close()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)

    print(
        f"\n1P1D cluster vs local engine: SmolLM2-135M, kv {args.kv_dtype}, {args.transport}, "
        f"{args.max_tokens} tokens/request, {os.cpu_count()} CPU cores, decode worker "
        f"{args.decode_threads} thread(s), local {torch.get_num_threads()}; medians of {args.rounds} rounds"
    )
    print(
        f"{'system':14} {'batch':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'tok/s':>7} {'TPOT ratio':>10}"
    )
    local = {r["batch"]: r for r in rows if r["system"] == "local"}
    for r in rows:
        ratio = r["tpot_p50_ms"] / local[r["batch"]]["tpot_p50_ms"]
        print(
            f"{r['system']:14} {r['batch']:>5} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms "
            f"{r['tpot_p50_ms']:>7.1f}ms {r['tpot_p99_ms']:>7.1f}ms {r['tok_s']:>7.1f} {ratio:>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
