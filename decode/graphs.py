"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padding.

A decode step of a small model is a few hundred short kernel launches; launching them
from Python costs more than running them. Capturing the whole step (embedding, layers,
LM head) once per batch size and replaying it turns those launches into one.

Design notes (what a graph bakes in, and how this file lives with it):
- Pointers. The inputs live in static buffers allocated here once (`inputs` [4, max_bs]
  holding token ids, positions, slots and context lengths; `block_tables`
  [max_bs, max_pages]); the KV cache is allocated once by the engine and never moves.
  A step copies its values into the buffers, then replays.
- Shapes. Batch sizes are bucketed (1, 2, 4, 8, then steps of 8 up to 64, then of 16);
  a step runs in the smallest bucket that holds it, padded. The block-table width is
  fixed at max_pages, so the decode kernel's split-K launch is the same on every replay.
- Padding rows cannot touch real pages: slot -1 makes `store_kv` skip the row and
  ctx_len 0 makes `decode_attention` read nothing (it returns zeros), so their stale
  block-table rows are never dereferenced. Their logits are computed and ignored.
- Memory. Buckets are captured largest first into one shared memory pool, so every
  smaller graph reuses the largest one's intermediates instead of adding its own.
- Capture happens during warm-up, before the worker reports ready; its time is returned.
  Every graph is also replayed once there, so its first launch (which uploads it) is not
  a request's.
- Decode batches larger than the largest bucket run eagerly (`run` returns None).
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.backend import Backend
from engine.kv_cache import KVCache
from engine.runner import HostStep

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16; max_batch_size is always the last."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    b = 16
    while b <= max_batch_size:
        sizes.append(b)
        b += 8 if b < 64 else 16
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def graph_inputs(step: HostStep, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's host tensors for bucket bs: rows [4, bs] int64 (token, position,
    slot, context; padding rows are token 0 at position 0, slot -1, context 0: they store
    nothing and read nothing) and the block table [n, width] int32 (0 past each end)."""
    pad = bs - step.num_seqs
    host = torch.tensor(
        [
            step.input_ids + [0] * pad,
            step.positions + [0] * pad,
            step.slots + [-1] * pad,
            step.ctx_lens + [0] * pad,
        ],
        dtype=torch.int64,
    )
    return host, step.table_array(np.int32)


def check_capturable(model: torch.nn.Module, backend: Backend) -> None:
    """Raise unless `model` on `backend` can run inside a CUDA graph."""
    if backend.name != "triton":
        # the torch reference reads lengths on the host and rejects slot -1 padding
        raise ValueError(f"CUDA graphs need the triton backend, got {backend.name!r}")
    if getattr(getattr(model, "cfg", None), "is_moe", False):
        # the MoE layer reads token counts per expert/rank on the host every step
        raise ValueError("CUDA graphs cannot capture an MoE model; run its steps eager")


def capture_buckets(buckets: list[int], step, device: torch.device) -> tuple[dict, dict]:
    """Capture `step(b)` for every bucket, largest first, into one memory pool (each smaller
    graph reuses the largest one's intermediates), then replay each once: the first launch
    of an instantiated graph uploads it, which belongs here and not in a request's step.
    -> (bucket -> CUDAGraph, bucket -> its static output). Call under inference mode."""
    graphs, outputs = {}, {}
    with torch.cuda.device(device):  # the pool, the graphs and the syncs on the cache's GPU
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(buckets):
            step(b)  # eager once: kernels compile and cuBLAS settles outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs[b] = step(b)
            graphs[b] = graph
        for b in buckets:
            graphs[b].replay()
        torch.cuda.synchronize()
    return graphs, outputs


class CudaGraphRunner:
    """Captures decode steps of `model` over `cache` and replays them (engine.runner.DecodeGraphs)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        backend: Backend,
        max_batch_size: int,
        max_model_len: int,
    ) -> None:
        if cache.data.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA KV cache, got {cache.data.device}")
        check_capturable(model, backend)
        self.model, self.cache, self.backend = model, cache, backend
        self.buckets = batch_buckets(max_batch_size)
        self.max_pages = -(-max_model_len // cache.page_size)
        dev = cache.data.device
        max_bs = self.buckets[-1]
        self.inputs = torch.zeros(4, max_bs, dtype=torch.int64, device=dev)  # ids, pos, slot, ctx
        self.inputs[2].fill_(-1)
        self.block_tables = torch.zeros(max_bs, self.max_pages, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served by a graph (the rest ran eagerly): for metrics
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> static output [bs, V] float32
        self.capture_seconds: float | None = None

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def _step(self, bs: int) -> torch.Tensor:
        """The captured region: one decode step of the first bs rows -> logits [bs, V]."""
        ids, pos, slots, ctx = self.inputs[:, :bs]  # four [bs] views
        meta = AttentionMetadata([1] * bs, [0] * bs, self.block_tables[:bs], slots, ctx)
        hidden = self.model(ids, pos, meta, self.cache, self.backend)  # [bs, hidden]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first, into one pool. -> seconds taken."""
        t0 = time.perf_counter()
        # The buffers still hold padding (slot -1, context 0), so the replays that upload
        # each graph store nothing and read no page.
        self.graphs, self.logits = capture_buckets(self.buckets, self._step, self.cache.data.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info(
            "captured %d decode graphs (batch %d..%d) in %.2fs",
            len(self.buckets),
            self.buckets[0],
            self.buckets[-1],
            self.capture_seconds,
        )
        return self.capture_seconds

    def bucket_for(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def run(self, step: HostStep) -> torch.Tensor | None:
        """Replay the bucket that holds `step` -> logits [B, V] (a view of a static buffer,
        valid until the next replay); None when no captured graph fits the step."""
        n = step.num_seqs
        bs = self.bucket_for(n)
        if bs is None or bs not in self.graphs or not step.is_decode:
            return None
        width = max(len(t) for t in step.tables)
        if width > self.max_pages:
            return None
        host, tables = graph_inputs(step, bs)
        self.inputs[:, :bs].copy_(host, non_blocking=True)
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        self.graphs[bs].replay()
        self.replays += 1
        return self.logits[bs][:n]


class VerifyGraphRunner(CudaGraphRunner):
    """Captured steps where every sequence feeds exactly `q_len` tokens and every row's
    logits come back: speculative verification (q_len = k + 1, one graph per batch bucket
    and k) and a draft model's two-token catch-up (q_len = 2).

    The step is a chunked-prefill extend over the paged KV, so attention takes the varlen
    path with a fixed `cu_q_lens` per bucket. Padding sequences feed q_len tokens at
    positions 0.. with slot -1 (nothing stored) and ctx_len q_len (a prefix of 0 tokens),
    so they read only their own (never stored) rows; their logits are ignored.
    """

    def __init__(self, model, cache, backend, max_batch_size: int, max_model_len: int, q_len: int):
        super().__init__(model, cache, backend, max_batch_size, max_model_len)
        if q_len < 1:
            raise ValueError(f"q_len must be >= 1, got {q_len}")
        self.q_len = q_len
        dev, max_bs = cache.data.device, self.buckets[-1]
        self.inputs = torch.zeros(3, max_bs * q_len, dtype=torch.int64, device=dev)  # ids, pos, slot
        self.inputs[2].fill_(-1)
        self.ctx = torch.full((max_bs,), q_len, dtype=torch.int64, device=dev)
        self.cu_q_lens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev) * q_len

    def _step(self, bs: int) -> torch.Tensor:
        """The captured region: bs sequences of q_len tokens -> logits [bs * q_len, V]."""
        q, t = self.q_len, bs * self.q_len
        ids, pos, slots = self.inputs[:, :t]  # three [t] views
        meta = AttentionMetadata(
            [q] * bs, [q] * bs, self.block_tables[:bs], slots, self.ctx[:bs], self.cu_q_lens[: bs + 1]
        )
        hidden = self.model(ids, pos, meta, self.cache, self.backend)  # [t, hidden]
        return self.model.compute_logits(hidden)

    def run(self, step: HostStep) -> torch.Tensor | None:
        """Replay -> logits [B * q_len, V] (a view of a static buffer); None when no graph fits."""
        n, q = step.num_seqs, self.q_len
        bs = self.bucket_for(n)
        if bs is None or bs not in self.graphs or any(ql != q for ql in step.q_lens):
            return None
        width = max(len(t) for t in step.tables)
        if width > self.max_pages:
            return None
        pad = (bs - n) * q
        host = torch.tensor(
            [
                step.input_ids + [0] * pad,
                step.positions + list(range(q)) * (bs - n),
                step.slots + [-1] * pad,
            ],
            dtype=torch.int64,
        )  # [3, bs * q]
        ctx = torch.tensor(step.ctx_lens + [q] * (bs - n), dtype=torch.int64)
        self.inputs[:, : bs * q].copy_(host, non_blocking=True)
        self.ctx[:bs].copy_(ctx, non_blocking=True)
        self.block_tables[:n, :width].copy_(step.table_array(np.int32), non_blocking=True)
        self.graphs[bs].replay()
        self.replays += 1
        return self.logits[bs][: n * q]
