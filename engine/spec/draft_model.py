"""The draft-model drafter: a small model of the same tokenizer runs k cheap decode steps.

Its K/V lives in a cache of its own that uses the *target's page ids*: a request's pages
hold both models' K/V, so the scheduler's page accounting (reserve, preempt, roll back)
covers the draft cache with no second pool. `Request.draft_len` counts the positions the
draft cache holds; the scheduler lowers it on rollback and zeroes it on preemption.

One round for a request with N tokens (K/V of the target up to N - 1):
  catch-up: feed tokens[draft_len:N] (normally the last one or two; the whole prompt the
            first time) -> d_1;  then feed d_j at position N - 1 + j -> d_{j+1}, j < k.
After the round the draft cache holds N + k - 1 positions; rejected ones are overwritten
later, exactly like the target's.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from engine.backend import Backend
from engine.kv_cache import KVCache, KVCacheSpec
from engine.request import Request
from engine.runner import HostStep, ModelRunner
from engine.sampling import _exponential
from engine.spec.drafters import Drafter, Proposal


def truncated_model(model: nn.Module, num_layers: int) -> nn.Module:
    """The target's first num_layers layers, its final norm and LM head (weights shared):
    the test/benchmark draft model when no smaller checkpoint of the tokenizer is at hand."""
    total = len(model.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"draft layers must be in [1, {total}], got {num_layers}")
    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # own module table: the target keeps all its layers
    draft.layers = nn.ModuleList(list(model.layers)[:num_layers])
    draft.cfg = dataclasses.replace(model.cfg, num_layers=num_layers)
    return draft


def host_step(requests: list[Request], starts: list[int], tokens: list[list[int]],
              page_size: int) -> HostStep:
    """Feed tokens[i] at positions starts[i].. of request i; sample after each one's last."""
    s = HostStep([], [], [], [], [], [], [], [], [])
    for req, start, ids in zip(requests, starts, tokens):
        end = start + len(ids)
        s.input_ids.extend(ids)
        s.positions.extend(range(start, end))
        s.slots.extend(req.pages[p // page_size] * page_size + p % page_size for p in range(start, end))
        s.q_lens.append(len(ids))
        s.ctx_lens.append(end)
        s.tables.append(req.pages)
        s.logits_rows.append(len(s.input_ids) - 1)
    return s


class DraftModelDrafter(Drafter):
    name = "draft"

    def __init__(self, model: nn.Module, num_pages: int, kv_dtype: torch.dtype,
                 device: torch.device, backend: Backend) -> None:
        cfg = model.cfg
        spec = KVCacheSpec(cfg.num_layers, num_pages, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
        self.runner = ModelRunner(model, KVCache(spec, device), device, backend)
        self.page_size = self.runner.page_size
        self.extend_graphs = None  # q_len-2 catch-up graphs (decode/graphs.py), CUDA only

    def capture(self, max_batch_size: int, max_model_len: int) -> None:
        from decode.graphs import CudaGraphRunner, VerifyGraphRunner

        r = self.runner
        args = (r.model, r.cache, r.backend, max_batch_size, max_model_len)
        r.graphs = CudaGraphRunner(*args)
        r.graphs.capture()
        self.extend_graphs = VerifyGraphRunner(*args, q_len=2)
        self.extend_graphs.capture()

    def _catch_up(self, requests: list[Request]) -> torch.Tensor:
        """Feed what the draft cache lacks, up to each last token -> logits [B, V]."""
        lags = [r.num_tokens - min(r.draft_len, r.num_computed_tokens) for r in requests]
        if max(lags) <= 2:  # the steady state: one fixed shape, a captured graph on CUDA
            starts = [r.num_tokens - 2 for r in requests]
        else:
            starts = [r.num_tokens - lag for r, lag in zip(requests, lags)]
        s = host_step(requests, starts, [r.token_ids(st, r.num_tokens) for r, st in zip(requests, starts)],
                      self.page_size)
        if self.extend_graphs is not None and max(lags) <= 2:
            logits = self.extend_graphs.run(s)  # [B * 2, V]
            if logits is not None:
                return logits[1::2]
        return self.runner.sampled_logits(s, use_graphs=False)

    def _draw(self, logits: torch.Tensor, requests: list[Request], temps: torch.Tensor,
              sampled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V] -> (tokens [B], q = softmax(logits / T) [B, V] or None if all greedy)."""
        greedy = logits.argmax(dim=-1)
        if not sampled:
            return greedy, None
        probs = torch.softmax(logits / temps.clamp_min(1e-5)[:, None], dim=-1)
        gens = [self.runner._generator(r) for r in requests]
        drawn = (probs / _exponential(probs.shape[-1], gens, probs.device)).argmax(dim=-1)
        return torch.where(temps == 0.0, greedy, drawn), probs

    @torch.inference_mode()
    def propose(self, requests: list[Request], k: int) -> Proposal:
        if not requests:
            return Proposal([])
        temps = torch.tensor([r.params.temperature for r in requests], dtype=torch.float32,
                             device=self.runner.device)
        sampled = any(not r.params.greedy for r in requests)
        logits = self._catch_up(requests)
        tokens, probs = [], []
        for j in range(k):
            t, q = self._draw(logits, requests, temps, sampled)
            tokens.append(t)
            probs.append(q)
            if j == k - 1:
                break
            ids = t.tolist()
            s = host_step(requests, [r.num_tokens + j for r in requests], [[i] for i in ids],
                          self.page_size)
            logits = self.runner.sampled_logits(s)  # a decode step: graph-replayed on CUDA
        for r in requests:
            r.draft_len = r.num_tokens + k - 1
        drafted = torch.stack(tokens, dim=1).tolist()  # [B, k]
        return Proposal(drafted, torch.stack(probs, dim=1) if sampled else None)
