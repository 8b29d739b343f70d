"""Prefill latency on a GPU: prefill graphs vs eager, and eager kernels direct vs through the op.

One prompt of n tokens, `ModelRunner.execute` of its whole prefill step (inputs built on
the host, model, the sampled row's logits, the token back on the host), in three modes on
the same engine, interleaved round by round:
- graph: replayed from a prefill CUDA graph (prefill/graphs.py), as the engine runs it;
- eager: the same kernels launched one by one from Python (the engine above 512 tokens);
- eager-op: eager, each Triton kernel called through its torch custom op (the dispatcher),
  which is how every eager call went before kernels._triton.KernelOp.
Seeded random bf16 weights of bench/shapes.py shapes; medians over rounds of the median
of `--calls` calls.

    python bench/prefill_latency.py                     # SmolLM2 and 8B shapes, ~1 min on an H200
    python bench/prefill_latency.py --models smollm2-135m --lengths 16,128,1024
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import format_table, ints  # noqa: E402
from bench.gpu_decode import build_engine, fill_cache_random, median_ms  # noqa: E402
from bench.shapes import SHAPES, shape  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.loader.registry import random_model  # noqa: E402
from engine.request import Request, ScheduledBatch, ScheduledSeq  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from kernels._triton import KernelOp  # noqa: E402

MODES = ("graph", "eager", "eager-op")


def _through_op(self, *args):
    return self.op(*args)


def prompt_batch(engine, n: int, seed: int) -> ScheduledBatch:
    g = torch.Generator().manual_seed(seed)
    req = Request(torch.randint(3, engine.model_config.vocab_size, (n,), generator=g).tolist(),
                  SamplingParams())
    req.pages = engine.pool.allocate(-(-n // 16))
    return ScheduledBatch([ScheduledSeq(req, n, True)])


def time_modes(engine, batch: ScheduledBatch, rounds: int, calls: int) -> dict[str, float]:
    runner, graphs, direct = engine.runner, engine.runner.prefill_graphs, KernelOp.__call__
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for _ in range(rounds):
            for mode in MODES:
                runner.prefill_graphs = graphs if mode == "graph" else None
                KernelOp.__call__ = _through_op if mode == "eager-op" else direct
                times[mode].append(median_ms(functools.partial(runner.execute, batch), calls))
    finally:
        runner.prefill_graphs, KernelOp.__call__ = graphs, direct
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,llama3-8b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--lengths", default="16,77,128,200,512,600")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("prefill_latency.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        shapes = {name: shape(name) for name in a.models.split(",")}
    except ValueError as e:
        print(f"prefill_latency.py: {e}", file=sys.stderr)
        return 2
    rows = []
    for name, hf_config in shapes.items():
        cfg = ModelConfig.from_hf(hf_config)
        model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
        engine = build_engine(cfg, model, argparse.Namespace(no_cuda_graph=False), num_pages=2048, max_seqs=8)
        fill_cache_random(engine)
        pg = engine.runner.prefill_graphs
        print(f"# {name}: warm-up {engine.warmup_seconds:.2f} s (prefill graphs {pg.capture_seconds:.2f} s, "
              f"buckets {pg.buckets})", flush=True)
        for n in ints(a.lengths):
            batch = prompt_batch(engine, n, seed=n)
            t = time_modes(engine, batch, a.rounds, a.calls)
            graphed = pg.bucket_for(n) is not None
            rows.append([name, n, t["graph"] if graphed else None, t["eager"], t["eager-op"],
                         f"{t['eager'] / t['graph']:.1f}x" if graphed else "no bucket",
                         f"{t['eager-op'] / t['eager']:.2f}x"])
            print(f"# {name} {n} tokens: " + ", ".join(f"{m} {v:.2f} ms" for m, v in t.items()), flush=True)
            engine.pool.free(batch.seqs[0].request.pages)
        del engine, model
        torch.cuda.empty_cache()
    print(f"\n# prefill step latency on {torch.cuda.get_device_name()}, ms (medians)")
    print(format_table(["model", "tokens", "graph", "eager", "eager-op", "eager/graph", "op/direct"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
