"""Host work of one graph-replayed decode step, on any machine (no GPU needed).

A CUDA-graph decode step's wall time is its replay plus the host work before it: turning
the scheduled batch into lists (`ModelRunner.collect`), and `CudaGraphRunner`'s static
input rows and block table (`decode.graphs.fill_graph_inputs`). On an H200 that host work was
3-5 ms of a 16-18 ms step at batch 32 x context 8192 (docs/PERF.md, seventh session).
This times those two parts on the CPU for a batch of `--batch` sequences of `--ctx`
tokens, each fed its last token.

    python bench/host_step.py [--batch 32] [--ctx 8192] [--iters 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from decode.graphs import fill_graph_inputs  # noqa: E402
from engine.page_pool import PAGE_SIZE  # noqa: E402
from engine.request import Request, ScheduledBatch, ScheduledSeq  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


class _HostOnly:
    """What ModelRunner.collect reads from its runner."""

    page_size = PAGE_SIZE
    device = "cpu"
    _generator = ModelRunner._generator


def make_batch(batch: int, ctx: int) -> ScheduledBatch:
    seqs = []
    for i in range(batch):
        req = Request(list(range(3, 3 + ctx - 8)), SamplingParams())
        req.output_token_ids = list(range(8))  # some decoded already
        req.pages = list(range(i * (ctx // PAGE_SIZE + 1), (i + 1) * (ctx // PAGE_SIZE + 1)))
        req.num_computed_tokens = ctx - 1
        seqs.append(ScheduledSeq(req, 1, True))
    return ScheduledBatch(seqs)


def time_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    sb = make_batch(a.batch, a.ctx)
    runner = _HostOnly()
    step = ModelRunner.collect(runner, sb)
    collect = time_ms(lambda: ModelRunner.collect(runner, sb), a.iters)
    rows = np.zeros((4, a.batch), dtype=np.int64)
    # as wide as a runner's table for 8192-token contexts (or --ctx, if longer)
    tables = np.zeros((a.batch, -(-max(a.ctx, 8192) // PAGE_SIZE)), dtype=np.int32)
    inputs = time_ms(lambda: fill_graph_inputs(step, a.batch, rows, tables), a.iters)
    print(f"# host work of one decode step, batch {a.batch} x ctx {a.ctx} ({a.iters} runs, median)")
    print(f"collect (batch -> host lists)        {collect:7.3f} ms")
    print(f"graph inputs (rows + block table)    {inputs:7.3f} ms")
    print(f"total                                {collect + inputs:7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
