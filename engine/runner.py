"""ModelRunner: turns a ScheduledBatch into tensors, runs the model, samples a StepOutput.

A step is first collected on the host (`HostStep`, plain lists), then either copied into
the static buffers of a captured CUDA graph (decode steps that fit a bucket, when graphs
are attached) or turned into fresh tensors for an eager forward pass.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.backend import TORCH_BACKEND, Backend
from engine.kv_cache import KVCache
from engine.request import Request, ScheduledBatch, StepOutput
from engine.sampling import SamplingBatch, sample


@dataclass
class HostStep:
    """One step as host lists: what both the eager and the graph path start from."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slots: list[int]  # [T]
    q_lens: list[int]  # [B]
    ctx_lens: list[int]  # [B]
    tables: list[list[int]]  # [B][pages of that sequence]
    logits_rows: list[int]  # [N] rows of the flat batch whose next token we sample
    params: list  # [N] SamplingParams
    generators: list  # [N] torch.Generator | None

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.q_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def cu_q_lens(self) -> list[int]:
        """[B + 1]: where each sequence's rows start in the flat batch, then the total."""
        return [0, *itertools.accumulate(self.q_lens)]

    def table_array(self, dtype=np.int64) -> torch.Tensor:
        """The block tables as one [B, width] CPU tensor, 0 past each sequence's pages.
        Filled row by row by numpy: torch.tensor on the nested lists took 2.1-2.2 ms at 32 x
        512 pages on the CI machine, this 0.4-0.8 (bench/host_step.py)."""
        width = max(len(t) for t in self.tables)
        out = np.zeros((len(self.tables), width), dtype=dtype)
        for row, pages in zip(out, self.tables):
            row[: len(pages)] = pages
        return torch.from_numpy(out)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_index: torch.Tensor  # [N] rows of the flat batch whose next token we sample
    sampling: SamplingBatch | None


class DecodeGraphs(Protocol):
    """What the runner needs from a CUDA-graph runner (decode/graphs.py implements it)."""

    def run(self, step: HostStep, tokens: bool = False,
            ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [B, V] of a decode step replayed from a graph, or with `tokens` its greedy
        tokens [B]; None when no graph fits. ids: device token ids [B] fed instead of the
        step's input_ids."""


class PrefillGraphs(Protocol):
    """What the runner needs from the prefill-graph runner (prefill/graphs.py implements it)."""

    replays: int

    def run(self, step: HostStep, tokens: bool = False) -> torch.Tensor | None:
        """Logits [N, V] of the step's sampled rows replayed from a graph, or with `tokens`
        their greedy tokens [N]; None when none fits."""


class PendingTokens:
    """The tokens [B] (and logprobs [B] when asked) of a launched step, on their way to the
    host: copies into pinned memory queued behind the step, so the host can launch the next
    step before it reads these (`wait`). `device` is what the next step may feed on the GPU:
    a graph's static output, valid until that bucket replays again."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None = None) -> None:
        self.device = tokens
        self._done = None
        if tokens.is_cuda:
            self._host = [self._pinned(t) for t in (tokens, logprobs) if t is not None]
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tokens.device))
        else:  # copies: a stand-in graph's static output is overwritten by the next replay
            self._host = [t.clone() for t in (tokens, logprobs) if t is not None]

    @staticmethod
    def _pinned(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def wait(self) -> StepOutput:
        if self._done is not None:
            self._done.synchronize()
        tokens, *logprobs = (t.tolist() for t in self._host)
        return StepOutput(tokens, logprobs[0] if logprobs else None)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        device: torch.device | str = "cpu",
        backend: Backend = TORCH_BACKEND,
    ):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.backend = backend
        self.page_size = cache.page_size
        self.graphs: DecodeGraphs | None = None  # attached after capture (decode/graphs.py)
        self.prefill_graphs: PrefillGraphs | None = None  # steps up to a token bucket (prefill/graphs.py)
        self.spec = None  # engine.spec.SpecDecoder when speculative decoding is on

    # ---- host side ----

    def collect(self, batch: ScheduledBatch, drafts: dict[str, list[int]] | None = None) -> HostStep:
        """drafts: request id -> the k tokens a verify seq feeds after its last token."""
        s = HostStep([], [], [], [], [], [], [], [], [])
        flat, ps = 0, self.page_size
        for seq in batch.seqs:
            req, n = seq.request, seq.num_new_tokens
            start = req.num_computed_tokens
            s.input_ids.extend(req.token_ids(start, start + n - seq.num_spec_tokens))
            if seq.num_spec_tokens:
                s.input_ids.extend(drafts[req.request_id])
            s.positions.extend(range(start, start + n))
            s.slots.extend(req.pages[p // ps] * ps + p % ps for p in range(start, start + n))
            s.q_lens.append(n)
            s.ctx_lens.append(start + n)
            s.tables.append(req.pages)
            flat += n
            if seq.sample:
                s.logits_rows.append(flat - 1)
                s.params.append(req.params)
                s.generators.append(self._generator(req))
        return s

    def collect_next(self, batch: ScheduledBatch) -> HostStep:
        """The decode step after `batch` (a decode batch not yet applied), collected before
        its tokens are known: each sequence feeds the token `batch` samples for it, one
        position further. The ids are placeholders (0): `launch(..., ids=)` feeds
        the tokens from the device. Each request must hold pages for
        num_computed_tokens + 2 tokens (`Scheduler.reserve`)."""
        s = HostStep([], [], [], [], [], [], [], [], [])
        ps = self.page_size
        for i, seq in enumerate(batch.seqs):
            req = seq.request
            pos = req.num_computed_tokens + 1  # `batch` feeds num_computed_tokens
            s.input_ids.append(0)
            s.positions.append(pos)
            s.slots.append(req.pages[pos // ps] * ps + pos % ps)
            s.q_lens.append(1)
            s.ctx_lens.append(pos + 1)
            s.tables.append(req.pages)
            s.logits_rows.append(i)
            s.params.append(req.params)
            s.generators.append(self._generator(req))
        return s

    def _generator(self, req: Request) -> torch.Generator | None:
        """A seeded request's generator, moved once to this runner's device (CPU-made)."""
        g = req.generator
        if g is not None and g.device != self.device:
            g = torch.Generator(self.device).manual_seed(req.params.seed)
            req.generator = g
        return g

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        # built on the host, copied without a stream sync (a no-op on CPU)
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def to_inputs(self, s: HostStep, sampling: bool = False) -> StepInputs:
        meta = AttentionMetadata(
            s.q_lens,
            s.ctx_lens,
            s.table_array().to(self.device, non_blocking=True),
            self._tensor(s.slots),
            self._tensor(s.ctx_lens),
            cu_q_lens=self._tensor(s.cu_q_lens, torch.int32),
        )
        sb = (
            SamplingBatch.build(s.params, s.generators, self.device)
            if sampling and s.params
            else None
        )
        return StepInputs(
            self._tensor(s.input_ids),
            self._tensor(s.positions),
            meta,
            self._tensor(s.logits_rows),
            sb,
        )

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        return self.to_inputs(self.collect(batch), sampling=True)

    # ---- device side ----

    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Final hidden states [T, hidden] of an eager pass."""
        return self.model(inp.input_ids, inp.positions, inp.meta, self.cache, self.backend)

    def sampled_logits(self, s: HostStep, use_graphs: bool = True) -> torch.Tensor:
        """Logits [N, V] float32 of the rows to sample; a captured graph when one fits."""
        logits = self._replay(s) if use_graphs else None
        return self._eager_logits(s) if logits is None else logits

    def _eager_logits(self, s: HostStep, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] of the rows to sample from an eager pass; ids: device token ids
        fed instead of s.input_ids."""
        inp = self.to_inputs(s)
        if ids is not None:
            inp.input_ids = ids
        return self.model.compute_logits(self.forward(inp)[inp.logits_index], self.backend)  # [N, V]

    def _replay(self, s: HostStep, tokens: bool = False,
                ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The sampled rows' logits [N, V], or with `tokens` their greedy tokens [N] (the
        argmax the graph captured), from a captured graph: decode steps from the decode
        graphs (ids: device token ids fed instead of s.input_ids), every other step from
        the prefill graphs. None when no graph fits."""
        if not s.is_decode:
            return None if self.prefill_graphs is None else self.prefill_graphs.run(s, tokens)
        out = None if self.graphs is None else self.graphs.run(s, tokens, ids)  # one row a sequence
        if out is None or len(s.logits_rows) == s.num_seqs:
            return out
        return out[self._tensor(s.logits_rows)]

    def _sample(self, s: HostStep, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Launch a sampling step -> (tokens [N], logprobs [N] or None) on the device: a
        greedy step without logprobs takes a graph's captured argmax; ids as `_replay`'s."""
        if all(p.greedy and not p.logprobs for p in s.params):
            tokens = self._replay(s, tokens=True, ids=ids)
            if tokens is None:  # what sample() does then
                tokens = self._eager_logits(s, ids).argmax(dim=-1)
            return tokens, None
        # built before the launch: its host->device copies then find the GPU idle
        sb = SamplingBatch.build(s.params, s.generators, self.device)
        logits = self._replay(s, ids=ids)
        return sample(self._eager_logits(s, ids) if logits is None else logits, sb)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        if batch.is_empty:
            return StepOutput([])
        if self.spec is not None and any(seq.num_spec_tokens for seq in batch.seqs):
            with self.backend.range(f"step verify seqs={len(batch.seqs)}"):
                return self.spec.execute(self, batch)
        s = self.collect(batch)
        kind = "decode" if s.is_decode else "prefill"
        with self.backend.range(f"step {kind} seqs={s.num_seqs} tokens={len(s.input_ids)}"):
            if not s.params:  # prefill chunks only: fill the cache, sample nothing
                if self.prefill_graphs is None or self.prefill_graphs.run(s) is None:
                    self.forward(self.to_inputs(s))
                return StepOutput([])
            tokens, logprobs = self._sample(s)
            return StepOutput(tokens.tolist(), None if logprobs is None else logprobs.tolist())

    @torch.inference_mode()
    def launch(self, s: HostStep, ids: torch.Tensor | None = None) -> PendingTokens:
        """Launch a decode step (every sequence samples) and return before it runs: its
        tokens come through the `PendingTokens`. ids: device token ids [B] fed instead of
        s.input_ids (the step before's tokens, not yet read on the host)."""
        with self.backend.range(f"step decode seqs={s.num_seqs} launched"):
            return PendingTokens(*self._sample(s, ids))

    def graph_steps(self) -> int:
        """Steps served by a captured graph (decode and prefill) since the counters were reset."""
        return sum(getattr(g, "replays", 0) for g in (self.graphs, self.prefill_graphs) if g is not None)

    @torch.inference_mode()
    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of every token fed this step [T, V], eager (for tests against a reference)."""
        hidden = self.forward(self.to_inputs(self.collect(batch)))
        return self.model.compute_logits(hidden, self.backend)

    @torch.inference_mode()
    def warmup_prefill(self, num_tokens: int = 32) -> None:
        """Run one throw-away prefill so that kernels compile before the first request.

        Triton backend only (the torch store rejects slot -1). Slots are -1, so nothing is
        stored, and the sequence reads page 0: no page a request owns is written.
        """
        n = max(1, min(num_tokens, self.cache.spec.num_pages * self.page_size))
        pages = -(-n // self.page_size)
        s = HostStep([0] * n, list(range(n)), [-1] * n, [n], [n], [[0] * pages], [n - 1], [], [])
        inp = self.to_inputs(s)
        self.model.compute_logits(self.forward(inp)[inp.logits_index], self.backend)
