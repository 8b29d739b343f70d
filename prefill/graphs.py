"""CUDA graphs for short prefill steps: one graph per token-count bucket, replayed padded.

An eager prefill of a short prompt is bound by the host, not the GPU: each layer is about
ten launches (norms, GEMMs, rotary + KV store, attention, activation) of ~15-30 us of
Python and driver time each, so a 128-token prompt of the 8B shape took 18-31 ms eager on
H200 machines, of which the GPU needed about 5 (docs/PERF.md, ninth session). TTFT of short prompts is that
number. Capturing the whole step (embedding, layers, the sampled rows' LM head) per
token-count bucket turns it into one launch.

What a graph bakes in, and how padding stays harmless:
- A bucket is (T tokens, S sequences): every step with at most T tokens over at most S
  sequences (prefill chunks, and mixed batches with decode rows too) runs in the smallest
  T that holds it. Static inputs: token ids, positions, slots [T]; per sequence its
  context length, the flat row whose logits are sampled, and cu_q_lens; block tables
  [S, max_pages]. The KV cache never moves.
- Padding tokens sit after the last sequence's rows, in no sequence (cu_q_lens ends at the
  real token count): slot -1 stores nothing, and attention leaves their output rows
  unwritten. Every other op is row-wise, so they never reach a real row.
- Padding sequences have q_len 0 and context 0: attention returns before reading their
  (stale) block-table rows. Their logits rows point at row 0 and are dropped.
- Attention's grid is sized for T queries per sequence; programs past a sequence's
  q_len return at once.
- Buckets are captured largest first into one memory pool, during warm-up.
- The static inputs arrive in one copy from a pinned host twin (`decode.graphs.StagedInputs`),
  and each graph also captures the argmax of the sampled rows, which a greedy step takes
  as its tokens.
- Results equal the eager step's up to rounding: the GEMMs run on the padded row count and
  attention's tiles are picked for the bucket (128 x 128 from 512 tokens on), so bf16
  logits can differ from an eager step's in the last bits (fp32: within 1e-3 in the GPU
  tests, same greedy tokens).
"""

from __future__ import annotations

import logging
import time

import torch

from decode.graphs import (
    StagedInputs,
    capture_buckets,
    check_capturable,
    fill_rows,
    fill_tables,
    smallest_bucket,
)
from engine.attention import AttentionMetadata
from engine.backend import Backend
from engine.kv_cache import KVCache
from engine.runner import HostStep

log = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then steps of half the previous power of two (192, 256, 384, 512,
    768, ...); max_tokens is always the last."""
    if max_tokens < 1:
        raise ValueError(f"max_prefill_graph_tokens must be >= 1, got {max_tokens}")
    sizes, t = [], 16
    while t <= max_tokens:
        sizes.append(t)
        t = t * 2 if t < 128 else t + (1 << (t.bit_length() - 2))
    if not sizes or sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class PrefillGraphRunner:
    """Captures non-decode steps of `model` over `cache` per token bucket and replays them."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, backend: Backend, max_tokens: int,
                 max_seqs: int, max_model_len: int) -> None:
        check_capturable(model, backend)
        if max_seqs < 1:
            raise ValueError(f"max_prefill_graph_seqs must be >= 1, got {max_seqs}")
        self.model, self.cache, self.backend = model, cache, backend
        self.buckets = token_buckets(max_tokens)
        self.max_seqs = max_seqs
        self.max_pages = -(-max_model_len // cache.page_size)
        dev = cache.data.device
        t, s = self.buckets[-1], max_seqs
        # token ids, positions, slots [T]; per sequence its context length [S], its sampled
        # row [S], then cu_q_lens [S + 1]; block tables [S, max_pages]
        self.staged = StagedInputs({"tokens": ((3, t), torch.int64), "seqs": ((3 * s + 1,), torch.int64),
                                    "tables": ((s, self.max_pages), torch.int32)}, dev)
        self.tokens, self.seqs = self.staged.device["tokens"], self.staged.device["seqs"]
        self.block_tables = self.staged.device["tables"]
        self.staged.host()["tokens"][2] = -1  # slot -1: padding stores nothing
        self.staged.upload()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> static output [S, V] float32
        self.argmax: dict[int, torch.Tensor] = {}  # bucket -> static greedy tokens [S] int64
        self.replays = 0
        self.capture_seconds: float | None = None

    def _step(self, t: int) -> torch.Tensor:
        """The captured region: up to S sequences packed in t rows -> logits [S, V]."""
        s = self.max_seqs
        ids, pos, slots = self.tokens[:, :t]
        ctx, rows, cu = self.seqs[:s], self.seqs[s: 2 * s], self.seqs[2 * s:]
        # host lengths only size the attention grid (t queries per sequence) and pick the
        # varlen path; the kernels read the real lengths from `ctx` and `cu` on the device
        meta = AttentionMetadata([t] + [0] * (s - 1), [t] + [0] * (s - 1), self.block_tables, slots,
                                 ctx, cu_q_lens=cu)
        hidden = self.model(ids, pos, meta, self.cache, self.backend)  # [t, hidden]
        return self.model.compute_logits(hidden[rows], self.backend)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first, into one pool. -> seconds taken."""
        t0 = time.perf_counter()
        # the buffers hold padding (slot -1, no sequences): the capture touches no page
        self.graphs, self.logits, self.argmax = capture_buckets(
            self.buckets, self._step, self.cache.data.device, argmax=True)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d prefill graphs (%d..%d tokens, up to %d sequences) in %.2fs",
                 len(self.buckets), self.buckets[0], self.buckets[-1], self.max_seqs,
                 self.capture_seconds)
        return self.capture_seconds

    def bucket_for(self, num_tokens: int) -> int | None:
        return smallest_bucket(self.buckets, num_tokens)

    def run(self, step: HostStep, tokens: bool = False) -> torch.Tensor | None:
        """Replay the bucket that holds `step` -> logits [N, V] of its sampled rows, or with
        `tokens` their greedy tokens [N] (views of static buffers, valid until the next
        replay); None when no graph fits."""
        n, s = len(step.input_ids), self.max_seqs
        t = self.bucket_for(n)  # None past the largest bucket, which is never in self.graphs
        if (t not in self.graphs or not 0 < step.num_seqs <= s
                or max(len(pages) for pages in step.tables) > self.max_pages):
            return None
        spad = s - step.num_seqs
        host = self.staged.host()
        fill_rows(host["tokens"], n, t, (step.input_ids, step.positions, step.slots), (0, 0, -1))
        rows = step.logits_rows + [0] * (s - len(step.logits_rows))
        host["seqs"][:] = step.ctx_lens + [0] * spad + rows + step.cu_q_lens + [n] * spad
        fill_tables(host["tables"], step.tables)
        self.staged.upload(rows=step.num_seqs)  # the tables come last: only the step's rows
        self.graphs[t].replay()
        self.replays += 1
        return (self.argmax if tokens else self.logits)[t][: len(step.logits_rows)]
