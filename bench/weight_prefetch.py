"""Decode steps with and without L2 weight prefetch (decode/prefetch.py), side by side.

For each model shape (seeded random bf16 weights) one engine is built; its own decode
graphs are the baseline ("off"). Every other variant captures its own graphs over the same
model and cache, and is checked to give the logits of the baseline (for lt+ variants, of
the first lt+ variant) bit for bit. Then each variant's batch-b graph is timed with CUDA
events around `replay()`, the variants interleaved round by round; medians are printed
against the weight-read floor.

Variants: off | bulk:CAP | loads:CAP, CAP in MiB or "all" (the whole weight), optionally
":P" programs (default 16), optionally prefixed "lt+" to capture with cuBLASLt as torch's
preferred BLAS library. The baseline ("off") is the engine's own graphs, built with the
weight prefetch off. With --loop, the engine loop's per-token time (run-ahead on) is
timed for each variant too; --profile prints each variant's top kernels at batch 1.

    python bench/weight_prefetch.py [--models smollm2-135m,llama3-8b] [--ctx 512]
        [--batches 1,8] [--variants off,bulk:8,bulk:32,bulk:all,loads:32] [--loop]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import format_table, progress  # noqa: E402
from bench.gpu_decode import (  # noqa: E402
    ab_engine,
    copy_bandwidth,
    decode_batch,
    logits_of_each,
    loop_rounds,
    print_top_kernels,
    release,
    replay_rounds,
    step_bytes,
)
from bench.kernel_trace import profile_calls  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402
from decode.prefetch import parse_setting  # noqa: E402


@dataclass
class Variant:
    label: str
    mode: str | None  # None: no prefetch
    cap_bytes: int
    programs: int
    lt: bool  # torch's preferred BLAS library cuBLASLt while capturing

    @property
    def baseline(self) -> bool:
        return self.mode is None and not self.lt


def parse_variant(text: str) -> Variant:
    """[lt+](off|bulk:CAP[:P]|loads:CAP[:P]) -> Variant (ValueError when malformed)."""
    lt = text.startswith("lt+")
    parts = (text[3:] if lt else text).split(":")
    if parts[0] == "off" and len(parts) == 1:
        return Variant(text, None, 0, 0, lt)
    if parts[0] not in ("bulk", "loads") or not 2 <= len(parts) <= 3:
        raise ValueError(f"bad variant {text!r}: want [lt+] then off, bulk:CAP[:P] or loads:CAP[:P]")
    cap = parse_setting(f"{parts[0]}:{parts[1]}")[1]
    programs = int(parts[2]) if len(parts) == 3 else 16
    return Variant(text, parts[0], cap, programs, lt)


def capture_variant(engine, v: Variant, max_bs: int):
    """Graphs for v over engine's model and cache (the baseline is the engine's own)."""
    from decode.graphs import CudaGraphRunner
    from decode.prefetch import WeightPrefetcher

    pf = None
    if v.mode is not None:
        pf = WeightPrefetcher(engine.runner.model, v.cap_bytes, v.mode, v.programs)
    saved = torch.backends.cuda.preferred_blas_library()
    if v.lt:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        g = CudaGraphRunner(engine.runner.model, engine.cache, engine.backend, max_bs,
                            engine.max_model_len, prefetch=pf)
        g.capture()
    finally:
        torch.backends.cuda.preferred_blas_library(saved)
    return g


def top_kernels(label: str, replay, steps: int = 20, top: int = 12) -> None:
    """Print the kernels of `steps` replays by GPU time per step (torch profiler)."""
    print_top_kernels(profile_calls(replay, steps), steps, label, top)


def run_model(name: str, a, variants: list[Variant], bw: float) -> list[list]:
    cfg, model, engine = ab_engine(name, a.batches, a.ctx, a.loop_steps, weight_prefetch="off")
    max_bs = max(a.batches)
    base = engine.runner.graphs
    runners = {}
    for v in variants:
        runners[v.label] = base if v.baseline else capture_variant(engine, v, max_bs)
    rows = []
    for b in a.batches:
        sb = decode_batch(engine, b, a.ctx)
        bs = base.bucket_for(b)
        refs = {}  # lt -> the first such variant's logits: prefetch must not change them
        for v, logits in zip(variants, logits_of_each(engine, runners, sb).values()):
            ref = refs.setdefault(v.lt, logits)
            if not torch.equal(logits, ref):
                diff = (logits - ref).abs().max().item()
                raise AssertionError(f"{name} b{b} {v.label}: logits differ by up to {diff} from "
                                     "the first variant with the same BLAS library")
        if len(refs) == 2:
            diff = (refs[True] - refs[False]).abs().max().item()
            print(f"# {name} b{b}: cuBLASLt vs cuBLAS, logits differ by up to {diff:.3g}")
        if a.profile and b == 1:
            for v in variants:
                top_kernels(f"{name} b1 {v.label}", runners[v.label].graphs[bs].replay)
        times = replay_rounds(runners, b, a.rounds, a.iters)
        release(engine, sb)
        floor = step_bytes(cfg, 2, b, a.ctx, 2.0) / bw * 1e3
        first = statistics.median(times[variants[0].label])
        for v in variants:
            ms = statistics.median(times[v.label])
            rows.append([name, b, v.label, f"{ms:.4f}", f"{min(times[v.label]):.4f}",
                         f"{ms / floor:.3f}", f"{first / ms:.3f}"])
        progress(f"{name} b{b} done")
    if a.loop:
        loops = loop_rounds(engine, runners, a.ctx, a.loop_steps)
        floor = step_bytes(cfg, 2, 1, a.ctx, 2.0) / bw * 1e3
        for v in variants:
            ms = statistics.median(loops[v.label])
            rows.append([name, "loop b1", v.label, f"{ms:.4f}", f"{min(loops[v.label]):.4f}",
                         f"{ms / floor:.3f}", ""])
    del engine, model, runners, base
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--variants", default="off,bulk:8,bulk:32,bulk:all,loads:32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--loop", action="store_true", help="also time the engine loop at batch 1")
    ap.add_argument("--loop-steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="print each variant's top kernels at batch 1")
    a = ap.parse_args()
    names = a.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown model shape(s) {unknown}; known: {sorted(SHAPES)}")
    try:
        a.batches = [int(x) for x in a.batches.split(",")]
        variants = [parse_variant(x) for x in a.variants.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        print("weight_prefetch.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, ctx {a.ctx}, copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"medians of {a.rounds} interleaved rounds of {a.iters} replays")
    rows = []
    for name in names:
        rows += run_model(name, a, variants, bw)
        print(format_table(["model", "batch", "variant", "replay ms", "best", "x floor",
                            f"speed-up vs {variants[0].label}"], rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
