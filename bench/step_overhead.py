"""Where a graph-replayed decode step's time goes, beyond its kernels (issue 4).

For each model shape (seeded random bf16 weights), batch 1 at context --ctx:
- step wall: `ModelRunner.execute` (host inputs, copies, replay, argmax, tokens to host);
- replay wall: the captured graph's `replay()` + a sync, nothing else;
- replay GPU: CUDA events around `replay()`;
- kernels: the sum of the replay's kernel durations (torch profiler), and their count.
So: host side = step wall - replay GPU; gaps inside the graph = replay GPU - kernels.

    python bench/step_overhead.py [--models smollm2-135m,llama3-8b] [--ctx 512]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpu_decode import (  # noqa: E402
    build_engine,
    decode_batch,
    event_ms,
    fill_cache_random,
    median_ms,
    release,
    sync,
)
from bench.shapes import SHAPES, shape  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.loader.registry import random_model  # noqa: E402


def kernel_time(fn, steps: int) -> tuple[float, float]:
    """(ms of kernels per call, kernels per call) over `steps` calls, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs = [e for e in evs if "Memcpy" not in e.name and "Memset" not in e.name]
    total_us = sum(e.device_time for e in evs)
    return total_us / steps / 1e3, len(evs) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    names = a.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown model shape(s) {unknown}; known: {sorted(SHAPES)}")
    if not torch.cuda.is_available():
        print("step_overhead.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    args = argparse.Namespace(no_cuda_graph=False)
    print(f"# {torch.cuda.get_device_name()}, batch 1, ctx {a.ctx}")
    print(f"{'model':12s} | step wall | replay wall | replay GPU | kernels | kernels/step | host | gaps")
    for name in names:
        cfg = ModelConfig.from_hf(shape(name))
        model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
        engine = build_engine(cfg, model, args, num_pages=2048, max_seqs=8)
        fill_cache_random(engine)
        sb = decode_batch(engine, 1, a.ctx)
        runner = engine.runner
        step = median_ms(functools.partial(runner.execute, sb), a.iters)
        graph = runner.graphs.graphs[1]
        runner.execute(sb)  # the static inputs now hold this step's values
        replay_wall = median_ms(graph.replay, a.iters)
        replay_gpu = event_ms(graph.replay, iters=a.iters)
        kern, count = kernel_time(graph.replay, 5)
        print(f"{name:12s} | {step:9.3f} | {replay_wall:11.3f} | {replay_gpu:10.3f} | {kern:7.3f} | "
              f"{count:12.0f} | {step - replay_gpu:4.3f} | {replay_gpu - kern:.3f}", flush=True)
        release(engine, sb)
        del engine, model, graph, runner, sb
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
