"""`miniinfer bench`: an open-loop load generator against the public gRPC API.

Requests arrive as a Poisson process at each rate given; prompt and output lengths
come from a named mix (or explicit ranges). Every request is sent as token ids with
`ignore_eos`, so its output length is exactly what the mix drew. Per request we keep
TTFT, TPOT, inter-token latencies and end-to-end time; per rate we report percentiles,
throughput and goodput (requests per second that met both the TTFT and the TPOT SLO).
Results go to JSON (and PNG plots when matplotlib is installed).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.errors import CLIError

# Token lengths: (low, high) drawn log-uniformly, so short and long both appear.
MIXES: dict[str, dict[str, tuple[int, int]]] = {
    "chat": {"prompt": (32, 512), "output": (32, 256)},
    "summarize": {"prompt": (1024, 4096), "output": (32, 128)},
    "tiny": {"prompt": (8, 32), "output": (2, 8)},  # smoke tests on CPU
}


@dataclass
class RequestSpec:
    index: int
    arrival_s: float  # offset from the start of the run
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    max_tokens: int
    status: str = "OK"  # a gRPC status code name, or OK
    detail: str = ""
    sent_s: float = 0.0  # when the request was actually sent (offset from start)
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # one entry per token after the first

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64:512' -> (64, 512)."""
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or lo < 1 or hi < lo:
        raise CLIError(f"--{name}: expected N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        part = part.strip()
        try:
            r = math.inf if part == "inf" else float(part)
        except ValueError:
            raise CLIError(f"--rate: expected comma-separated numbers (req/s) or 'inf', got {part!r}") from None
        if not (r > 0) or math.isnan(r):
            raise CLIError(f"--rate: each rate must be > 0, got {part!r}")
        rates.append(r)
    return rates


def _draw(rng: random.Random, lo: int, hi: int) -> int:
    if lo == hi:
        return lo
    return min(hi, max(lo, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)) - 1e-9)))))


def make_workload(num: int, rate: float, prompt: tuple[int, int], output: tuple[int, int],
                  token_range: tuple[int, int], seed: int) -> list[RequestSpec]:
    """Poisson arrivals at `rate` req/s (all at t=0 for inf), lengths log-uniform in the ranges."""
    rng = random.Random(seed)
    t, specs = 0.0, []
    for i in range(num):
        if i and math.isfinite(rate):
            t += rng.expovariate(rate)
        n = _draw(rng, *prompt)
        ids = [rng.randrange(token_range[0], token_range[1]) for _ in range(n)]
        specs.append(RequestSpec(i, t, ids, _draw(rng, *output)))
    return specs


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: list[RequestRecord], duration_s: float, rate: float,
              slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ok = [r for r in records if r.ok]
    good = [r for r in ok if r.ttft_s is not None and r.ttft_s <= slo_ttft_s
            and (r.tpot_s is None or r.tpot_s <= slo_tpot_s)]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1

    def pct(values):
        return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}

    duration_s = max(duration_s, 1e-9)
    return {
        "rate": rate if math.isfinite(rate) else "inf",
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(r.output_tokens for r in ok) / duration_s,
        "ttft_s": pct([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": pct([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": pct([x for r in ok for x in r.itl_s]),
        "e2e_s": pct([r.e2e_s for r in ok if r.e2e_s is not None]),
        "slo_attainment": len(good) / len(records) if records else 0.0,
        "goodput": len(good) / duration_s,
    }


def max_rate_meeting(summaries: list[dict], attainment: float = 0.9) -> float | None:
    """Highest finite rate whose SLO attainment is at least `attainment` (None if none)."""
    rates = [s["rate"] for s in summaries if s["rate"] != "inf" and s["slo_attainment"] >= attainment]
    return max(rates) if rates else None


async def _one(stub, pb, spec: RequestSpec, start: float, timeout_s: float, metadata=None) -> RequestRecord:
    import grpc

    from cluster.client import build_request

    rec = RequestRecord(spec.index, len(spec.prompt_ids), spec.max_tokens)
    req = build_request(token_ids=spec.prompt_ids, max_tokens=spec.max_tokens, temperature=0.0,
                        ignore_eos=True)
    t0 = time.perf_counter()
    rec.sent_s = t0 - start
    last = None
    try:
        async for msg in stub.Generate(req, timeout=timeout_s, metadata=metadata):
            now = time.perf_counter()
            n = len(msg.token_ids)
            if n:
                if last is None:
                    rec.ttft_s = now - t0
                    rec.itl_s.extend([0.0] * (n - 1))  # tokens that came with the first one
                else:
                    rec.itl_s.extend([(now - last) / n] * n)
                last = now
                rec.output_tokens += n
            if msg.finish_reason == pb.FINISH_REASON_ERROR:
                rec.status, rec.detail = "FINISH_ERROR", msg.finish_message
            elif msg.finish_reason == pb.FINISH_REASON_ABORT:
                rec.status, rec.detail = "FINISH_ABORT", msg.finish_message
        rec.e2e_s = time.perf_counter() - t0
    except grpc.aio.AioRpcError as e:
        rec.status, rec.detail = e.code().name, e.details() or ""
    return rec


async def run_rate(address: str, specs: list[RequestSpec], timeout_s: float,
                   max_concurrency: int | None = None, token: str | None = None,
                   tls_ca: str | None = None) -> tuple[list[RequestRecord], float]:
    """Send `specs` at their arrival times; returns records and the run's duration.

    token / tls_ca: the router's api_token and TLS CA file (default: $MINIINFER_API_TOKEN,
    $MINIINFER_TLS_CA), as for `miniinfer generate`."""
    import grpc

    from cluster.client import credentials
    from protos.miniinfer.v1 import miniinfer_pb2 as pb
    from protos.miniinfer.v1 import miniinfer_pb2_grpc as pb_grpc

    metadata, creds = credentials(token, tls_ca)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    async with channel:
        stub = pb_grpc.MiniInferStub(channel)
        start = time.perf_counter()

        async def fire(spec: RequestSpec) -> RequestRecord:
            delay = spec.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                return await _one(stub, pb, spec, start, timeout_s, metadata)
            async with sem:
                return await _one(stub, pb, spec, start, timeout_s, metadata)

        records = await asyncio.gather(*(fire(s) for s in specs))
        return list(records), time.perf_counter() - start


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def format_table(summaries: list[dict]) -> str:
    head = (f"{'rate':>6} {'reqs':>5} {'ok':>5} {'req/s':>7} {'tok/s':>8} "
            f"{'TTFT p50/p90/p99 ms':>22} {'TPOT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>22} "
            f"{'SLO%':>6} {'goodput':>8}")
    lines = [head]
    for s in summaries:
        trip = {k: "/".join(_fmt_ms(s[k][f"p{q}"]) for q in (50, 90, 99)) for k in ("ttft_s", "tpot_s", "itl_s")}
        rate = s["rate"] if s["rate"] == "inf" else f"{s['rate']:g}"
        lines.append(f"{rate:>6} {s['requests']:>5} {s['ok']:>5} {s['request_throughput']:>7.2f} "
                     f"{s['output_throughput']:>8.1f} {trip['ttft_s']:>22} {trip['tpot_s']:>22} "
                     f"{trip['itl_s']:>22} {100 * s['slo_attainment']:>5.1f}% {s['goodput']:>8.2f}")
    return "\n".join(lines)


def write_plots(out_dir: Path, runs: list[dict], slo_ttft_s: float, slo_tpot_s: float, tag: str = "",
                goodput: bool = True) -> list[Path]:
    """Latency CDFs per rate (latency_cdf{tag}.png), and goodput / attainment vs rate
    (goodput_vs_rate{tag}.png, unless goodput=False). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        recs = [r for r in run["records"] if r["status"] == "OK"]
        series = {
            "TTFT (ms)": [r["ttft_s"] * 1e3 for r in recs if r["ttft_s"] is not None],
            "TPOT (ms)": [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) * 1e3
                          for r in recs if r["output_tokens"] > 1],
            "ITL (ms)": [x * 1e3 for r in recs for x in r["itl_s"]],
        }
        for ax, (name, vals) in zip(axes, series.items()):
            if vals:
                v = sorted(vals)
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=f"rate {run['summary']['rate']}")
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests" if name != "ITL (ms)" else "fraction of tokens")
    axes[0].axvline(slo_ttft_s * 1e3, color="gray", linestyle="--", linewidth=1)
    axes[1].axvline(slo_tpot_s * 1e3, color="gray", linestyle="--", linewidth=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / f"latency_cdf{tag}.png"))

    finite = [r["summary"] for r in runs if r["summary"]["rate"] != "inf"]
    if finite and goodput:
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [s["rate"] for s in finite]
        ax.plot(rates, [s["goodput"] for s in finite], marker="o", label="goodput (req/s)")
        ax.plot(rates, rates, color="gray", linestyle=":", linewidth=1, label="offered rate")
        ax2 = ax.twinx()
        ax2.plot(rates, [100 * s["slo_attainment"] for s in finite], marker="x", color="tab:red",
                 label="SLO attainment (%)")
        ax2.axhline(90, color="tab:red", linestyle="--", linewidth=0.8)
        ax2.set_ylim(0, 105)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("goodput (req/s)")
        ax2.set_ylabel("SLO attainment (%)")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out_dir / f"goodput_vs_rate{tag}.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="load-test a running cluster: Poisson arrivals, latency percentiles, goodput")
    b.add_argument("--address", default="127.0.0.1:50051", help="router address")
    b.add_argument("--rate", default="4", help="request rate(s) in req/s, comma-separated; 'inf' = all at once")
    b.add_argument("--num-requests", type=int, default=100, help="requests per rate")
    b.add_argument("--mix", default="chat", choices=sorted(MIXES), help="prompt/output length preset")
    b.add_argument("--prompt-len", default=None, help="override the mix: N or LOW:HIGH tokens")
    b.add_argument("--output-len", default=None, help="override the mix: N or LOW:HIGH tokens")
    b.add_argument("--token-range", default="100:10000", help="prompt token ids are drawn from LOW:HIGH")
    b.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    b.add_argument("--slo-tpot-ms", type=float, default=100.0)
    b.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    b.add_argument("--timeout", type=float, default=300.0, help="per-request deadline (s)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=None, help="folder for bench.json and PNG plots")
    b.add_argument("--label", default="", help="free text stored in the JSON (e.g. the config name)")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    rates = parse_rates(args.rate)
    mix = MIXES[args.mix]
    prompt = parse_range(args.prompt_len, "prompt-len") if args.prompt_len else mix["prompt"]
    output = parse_range(args.output_len, "output-len") if args.output_len else mix["output"]
    token_range = parse_range(args.token_range, "token-range")
    if token_range[1] <= token_range[0]:
        raise CLIError("--token-range: HIGH must be greater than LOW")
    if args.num_requests < 1:
        raise CLIError("--num-requests must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise CLIError("--max-concurrency must be >= 1")
    if not (args.slo_ttft_ms > 0 and args.slo_tpot_ms > 0 and args.timeout > 0):
        raise CLIError("--slo-ttft-ms, --slo-tpot-ms and --timeout must be > 0")
    _check_reachable(args.address)

    slo_ttft, slo_tpot = args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3
    runs = []
    for i, rate in enumerate(rates):
        specs = make_workload(args.num_requests, rate, prompt, output, token_range, args.seed + i)
        print(f"[bench] rate {rate:g} req/s: {len(specs)} requests, prompt {prompt[0]}-{prompt[1]}, "
              f"output {output[0]}-{output[1]} tokens", file=sys.stderr, flush=True)
        records, duration = asyncio.run(run_rate(args.address, specs, args.timeout, args.max_concurrency))
        summary = summarize(records, duration, rate, slo_ttft, slo_tpot)
        print(json.dumps({"summary": summary}), flush=True)
        runs.append({"summary": summary, "records": [asdict(r) for r in records]})

    summaries = [r["summary"] for r in runs]
    best = max_rate_meeting(summaries)
    result = {
        "label": args.label, "address": args.address, "mix": args.mix, "prompt_len": prompt,
        "output_len": output, "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
        "seed": args.seed, "max_rate_at_90pct_slo": best, "runs": runs,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=1))
        try:
            plots = write_plots(out, runs, slo_ttft, slo_tpot)
        except ImportError:
            plots = []
            print("[bench] matplotlib is not installed (pip install 'miniinfer[bench]'): no plots",
                  file=sys.stderr)
        print(f"[bench] wrote {out / 'bench.json'}" + "".join(f", {p}" for p in plots), file=sys.stderr)
    print(format_table(summaries))
    print(f"SLO: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms; highest rate with "
          f">= 90% attainment: {'none' if best is None else f'{best:g} req/s'}")
    return 0


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    import grpc

    from protos.miniinfer.v1 import miniinfer_pb2 as pb
    from protos.miniinfer.v1 import miniinfer_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.MiniInferStub(ch).GetClusterStatus(pb.ClusterStatusRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            raise CLIError(f"cannot reach a MiniInfer router at {address}: {e.code().name}") from None
