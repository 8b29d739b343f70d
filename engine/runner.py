"""ModelRunner: turns a ScheduledBatch into tensors, runs the model, samples a StepOutput."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.kv_cache import KVCache
from engine.request import ScheduledBatch, StepOutput
from engine.sampling import SamplingBatch, sample


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_index: torch.Tensor  # [N] rows of the flat batch whose next token we sample
    sampling: SamplingBatch | None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: KVCache, device: torch.device | str = "cpu"):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.page_size = cache.page_size

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        ids, pos, slots, q_lens, ctx_lens, tables, last = [], [], [], [], [], [], []
        params, gens = [], []
        flat = 0
        for seq in batch.seqs:
            req, n = seq.request, seq.num_new_tokens
            start = req.num_computed_tokens
            tokens = req.all_token_ids[start : start + n]
            ids.extend(tokens)
            pos.extend(range(start, start + n))
            slots.extend(req.pages[p // self.page_size] * self.page_size + p % self.page_size for p in range(start, start + n))
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(req.pages)
            flat += n
            if seq.sample:
                last.append(flat - 1)
                params.append(req.params)
                gens.append(req.generator)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]

        def t(x):
            return torch.tensor(x, dtype=torch.int64, device=self.device)

        meta = AttentionMetadata(q_lens, ctx_lens, t(table), t(slots), t(ctx_lens))
        sb = SamplingBatch.build(params, gens, self.device) if params else None
        return StepInputs(t(ids), t(pos), meta, t(last), sb)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        if batch.is_empty:
            return StepOutput([])
        inp = self.prepare(batch)
        hidden = self.model(inp.input_ids, inp.positions, inp.meta, self.cache)  # [T, hidden]
        if inp.sampling is None:
            return StepOutput([])
        logits = self.model.compute_logits(hidden[inp.logits_index])  # [N, V]
        tokens, logprobs = sample(logits, inp.sampling)
        return StepOutput(tokens.tolist(), None if logprobs is None else logprobs.tolist())

    @torch.inference_mode()
    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of every token fed this step [T, V] (for tests against a reference)."""
        inp = self.prepare(batch)
        hidden = self.model(inp.input_ids, inp.positions, inp.meta, self.cache)
        return self.model.compute_logits(hidden)
