"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padding.

A decode step of a small model is a few hundred short kernel launches; launching them
from Python costs more than running them. Capturing the whole step (embedding, layers,
LM head) once per batch size and replaying it turns those launches into one.

Design notes (what a graph bakes in, and how this file lives with it):
- Pointers. The inputs live in static buffers allocated here once (`inputs` [4, max_bs]
  holding token ids, positions, slots and context lengths; `block_tables`
  [max_bs, max_pages]); the KV cache is allocated once by the engine and never moves.
  A step writes its values into a pinned host twin of the buffers (`StagedInputs`),
  copies them over in one asynchronous copy, then replays.
- Outputs. Each decode graph ends in the logits and their argmax, so a greedy batch's
  tokens need no launch after the replay (verify graphs return logits only).
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
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.backend import Backend
from engine.kv_cache import KVCache
from engine.runner import HostStep

if TYPE_CHECKING:
    from decode.prefetch import WeightPrefetcher

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


def fill_rows(rows: np.ndarray, n: int, end: int, values, pads) -> None:
    """rows[i, :n] = values[i] and rows[i, n:end] = pads[i] (a scalar or an array), for the
    static input rows of a graph: the step's own columns, then its bucket's padding."""
    for row, value, pad in zip(rows, values, pads, strict=True):
        row[:n], row[n:end] = value, pad


def fill_tables(out: np.ndarray, tables: list[list[int]]) -> None:
    """Row i of `out` = tables[i] (a sequence's pages), then 0; rows past len(tables) keep
    what they held: page ids a padding sequence of a decode or prefill graph never reads
    (it has no context), and a verify graph's reads only for logits that are dropped."""
    for row, pages in zip(out, tables):
        row[: len(pages)] = pages
        row[len(pages):] = 0


def fill_graph_inputs(step: HostStep, bs: int, inputs: np.ndarray, tables: np.ndarray) -> None:
    """Write a decode step's inputs for bucket bs into host arrays: `inputs` [4, >= bs] int64
    rows (token, position, slot, context; padding columns are token 0 at position 0, slot
    -1, context 0: they store nothing and read nothing) and `tables` [>= n, width] int32
    (`fill_tables`)."""
    fill_rows(inputs, step.num_seqs, bs, (step.input_ids, step.positions, step.slots, step.ctx_lens),
              (0, 0, -1, 0))
    fill_tables(tables, step.tables)


class StagedInputs:
    """A captured graph's static inputs: views of one device byte buffer, each field at an
    8-byte boundary in the order given, with a host twin (pinned on CUDA) that a step fills
    through numpy views and sends in one asynchronous copy. The decode step's two copies
    from pageable memory took 36 us of a 1.04 ms SmolLM2 step on an H200.

    fields: name -> (shape, dtype). `device[name]` are the tensors a graph captures,
    `host()[name]` the arrays to fill; `upload()` sends them all, `upload(rows=n)` every
    field but the last and the last one's first n rows (the block tables: only the rows
    of the step's sequences)."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device) -> None:
        self.offsets, size = {}, 0
        for name, (shape, dtype) in fields.items():
            size = -(-size // 8) * 8
            self.offsets[name] = size
            size += int(np.prod(shape)) * dtype.itemsize
        self.nbytes, self.last = size, list(fields)[-1]
        last_shape, last_dtype = fields[self.last]
        self._last_row_bytes = int(np.prod(last_shape[1:])) * last_dtype.itemsize
        cuda = device.type == "cuda"
        self._device = torch.zeros(size, dtype=torch.uint8, device=device)
        self._host = torch.zeros(size, dtype=torch.uint8, pin_memory=cuda)
        self.device = self._views(self._device, fields)
        self._host_arrays = {k: v.numpy() for k, v in self._views(self._host, fields).items()}
        self._copied = torch.cuda.Event() if cuda else None  # recorded after each upload

    def _views(self, buffer: torch.Tensor, fields) -> dict[str, torch.Tensor]:
        views = {}
        for name, (shape, dtype) in fields.items():
            start = self.offsets[name]
            n = int(np.prod(shape)) * dtype.itemsize
            views[name] = buffer[start: start + n].view(dtype).view(shape)
        return views

    def host(self) -> dict[str, np.ndarray]:
        """The host twin's arrays, once the last upload has left them."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_arrays

    def upload(self, rows: int | None = None) -> None:
        """Copy the host twin to the device: all of it, or every field before the last and
        the last one's first `rows` rows."""
        end = self.nbytes if rows is None else self.offsets[self.last] + rows * self._last_row_bytes
        self._device[:end].copy_(self._host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self._device.device))


def check_capturable(model: torch.nn.Module, backend: Backend) -> None:
    """Raise unless `model` on `backend` can run inside a CUDA graph."""
    if backend.name != "triton":
        # the torch reference reads lengths on the host and rejects slot -1 padding
        raise ValueError(f"CUDA graphs need the triton backend, got {backend.name!r}")
    if getattr(getattr(model, "cfg", None), "is_moe", False):
        # the MoE layer reads token counts per expert/rank on the host every step
        raise ValueError("CUDA graphs cannot capture an MoE model; run its steps eager")


def smallest_bucket(buckets: list[int], n: int) -> int | None:
    """The smallest of the sorted `buckets` that holds n; None past the largest."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def capture_buckets(buckets: list[int], step, device: torch.device,
                    argmax: bool) -> tuple[dict, dict, dict]:
    """Capture `step(b)` (-> logits) for every bucket, largest first, into one memory pool
    (each smaller graph reuses the largest one's intermediates), then replay each once: the
    first launch of an instantiated graph uploads it, which belongs here and not in a
    request's step. With `argmax`, each graph also ends in the logits' argmax, so a greedy
    step needs no launch after its replay (an eager argmax took 13.5 us of host time in a
    1.04 ms SmolLM2 decode step on an H200).
    -> (bucket -> CUDAGraph, bucket -> static logits, bucket -> static argmax, empty without
    `argmax`). Call under inference mode."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA KV cache, got {device}")
    graphs, logits, tokens = {}, {}, {}
    with torch.cuda.device(device):  # the pool, the graphs and the syncs on the cache's GPU
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(buckets):
            step(b)  # eager once: kernels compile and cuBLAS settles outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits[b] = step(b)
                if argmax:
                    tokens[b] = logits[b].argmax(dim=-1)
            graphs[b] = graph
        for b in buckets:
            graphs[b].replay()
        torch.cuda.synchronize()
    return graphs, logits, tokens


class CudaGraphRunner:
    """Captures decode steps of `model` over `cache` and replays them (engine.runner.DecodeGraphs)."""

    captures_argmax = True  # each graph ends in its logits' argmax (capture_buckets)

    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        backend: Backend,
        max_batch_size: int,
        max_model_len: int,
        prefetch: WeightPrefetcher | None = None,
    ) -> None:
        """prefetch: captured steps prefetch each GEMV's weight into L2 (decode/prefetch.py)."""
        check_capturable(model, backend)
        self.model, self.cache, self.backend = model, cache, backend
        self.prefetch = prefetch
        self.buckets = batch_buckets(max_batch_size)
        self.max_pages = -(-max_model_len // cache.page_size)
        dev = cache.data.device
        max_bs = self.buckets[-1]
        self.staged = StagedInputs(self._fields(max_bs), dev)
        self._pad(self.staged.host())  # what the capture and the upload replays read
        self.staged.upload()
        self.inputs, self.block_tables = self.staged.device["inputs"], self.staged.device["tables"]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served by a graph (the rest ran eagerly): for metrics
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> static output [bs, V] float32
        self.argmax: dict[int, torch.Tensor] = {}  # bucket -> static greedy tokens [bs] int64
        self.capture_seconds: float | None = None

    def _fields(self, max_bs: int) -> dict:
        """The static inputs (`StagedInputs` fields); the block tables come last, so a step
        uploads the fields before them and only its own table rows."""
        return {"inputs": ((4, max_bs), torch.int64),  # ids, positions, slots, contexts
                "tables": ((max_bs, self.max_pages), torch.int32)}

    def _pad(self, host: dict) -> None:
        host["inputs"][2] = -1  # slot -1: padding rows store nothing (context 0 reads nothing)

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def _step(self, bs: int) -> torch.Tensor:
        """The captured region: one decode step of the first bs rows -> logits [bs, V]."""
        ids, pos, slots, ctx = self.inputs[:, :bs]  # four [bs] views
        meta = AttentionMetadata([1] * bs, [0] * bs, self.block_tables[:bs], slots, ctx)
        with self.prefetch.active() if self.prefetch else contextlib.nullcontext():
            hidden = self.model(ids, pos, meta, self.cache, self.backend)  # [bs, hidden]
            return self.model.compute_logits(hidden, self.backend)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first, into one pool. -> seconds taken."""
        t0 = time.perf_counter()
        # The buffers still hold padding (slot -1, context 0), so the replays that upload
        # each graph store nothing and read no page.
        self.graphs, self.logits, self.argmax = capture_buckets(
            self.buckets, self._step, self.cache.data.device, self.captures_argmax)
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
        return smallest_bucket(self.buckets, n)

    def run(self, step: HostStep, tokens: bool = False,
            ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replay the bucket that holds `step` -> logits [B, V], or with `tokens` the greedy
        tokens [B] int64 (views of static buffers, valid until the next replay); None when
        no captured graph fits the step. ids: device token ids [B] copied over the step's
        input ids after the upload (the run-ahead step feeds the step before's argmax)."""
        n = step.num_seqs
        bs = self.bucket_for(n)
        if bs is None or bs not in self.graphs or not step.is_decode:
            return None
        if max(len(t) for t in step.tables) > self.max_pages:
            return None
        host = self.staged.host()
        fill_graph_inputs(step, bs, host["inputs"], host["tables"])
        self.staged.upload(rows=n)  # the tables come last: the inputs and n table rows
        if ids is not None:
            self.inputs[0, :n].copy_(ids)  # stream-ordered after the upload and the step before
        self.graphs[bs].replay()
        self.replays += 1
        return (self.argmax if tokens else self.logits)[bs][:n]


class VerifyGraphRunner(CudaGraphRunner):
    """Captured steps where every sequence feeds exactly `q_len` tokens and every row's
    logits come back: speculative verification (q_len = k + 1, one graph per batch bucket
    and k) and a draft model's two-token catch-up (q_len = 2).

    The step is a chunked-prefill extend over the paged KV, so attention takes the varlen
    path with a fixed `cu_q_lens` per bucket. Padding sequences feed q_len tokens at
    positions 0.. with slot -1 (nothing stored) and ctx_len q_len (a prefix of 0 tokens):
    they read q_len keys through whatever pages their (stale) table row names, and their
    logits are ignored.
    """

    captures_argmax = False  # verification reads the logits

    def __init__(self, model, cache, backend, max_batch_size: int, max_model_len: int, q_len: int):
        if q_len < 1:
            raise ValueError(f"q_len must be >= 1, got {q_len}")
        self.q_len = q_len  # before the base class sizes the staged inputs by it
        super().__init__(model, cache, backend, max_batch_size, max_model_len)
        self.ctx = self.staged.device["ctx"]
        dev, max_bs = cache.data.device, self.buckets[-1]
        self.cu_q_lens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev) * q_len

    def _fields(self, max_bs: int) -> dict:
        return {"inputs": ((3, max_bs * self.q_len), torch.int64),  # ids, positions, slots
                "ctx": ((max_bs,), torch.int64),
                "tables": ((max_bs, self.max_pages), torch.int32)}

    def _pad(self, host: dict) -> None:
        host["inputs"][2] = -1  # padding stores nothing...
        host["ctx"][:] = self.q_len  # ...and reads only its own q_len (never stored) rows

    def _step(self, bs: int) -> torch.Tensor:
        """The captured region: bs sequences of q_len tokens -> logits [bs * q_len, V]."""
        q, t = self.q_len, bs * self.q_len
        ids, pos, slots = self.inputs[:, :t]  # three [t] views
        meta = AttentionMetadata(
            [q] * bs, [q] * bs, self.block_tables[:bs], slots, self.ctx[:bs], self.cu_q_lens[: bs + 1]
        )
        hidden = self.model(ids, pos, meta, self.cache, self.backend)  # [t, hidden]
        return self.model.compute_logits(hidden, self.backend)

    def run(self, step: HostStep, tokens: bool = False) -> torch.Tensor | None:
        """Replay -> logits [B * q_len, V] (a view of a static buffer); None when no graph
        fits. These graphs capture no argmax: `tokens` must be False."""
        if tokens:
            raise ValueError("verify graphs return logits only (tokens=True is not captured)")
        n, q = step.num_seqs, self.q_len
        bs = self.bucket_for(n)
        if bs is None or bs not in self.graphs or any(ql != q for ql in step.q_lens):
            return None
        if max(len(t) for t in step.tables) > self.max_pages:
            return None
        host = self.staged.host()
        fill_rows(host["inputs"], n * q, bs * q, (step.input_ids, step.positions, step.slots),
                  (0, np.tile(np.arange(q), bs - n), -1))
        fill_rows(host["ctx"][None], n, bs, (step.ctx_lens,), (q,))
        fill_tables(host["tables"], step.tables)
        self.staged.upload(rows=n)  # the tables come last: the inputs and n table rows
        self.graphs[bs].replay()
        self.replays += 1
        return self.logits[bs][: n * q]
