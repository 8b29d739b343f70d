"""Test helpers: drive the engine step by step and compare against HF."""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache, KVCacheSpec
from engine.page_pool import PagePool
from engine.request import Request, ScheduledBatch, ScheduledSeq
from engine.runner import ModelRunner
from engine.sampling import SamplingParams


class StepDriver:
    """Feeds one sequence through the runner: a prefill, then one token at a time."""

    def __init__(self, model, kv_dtype=torch.float32, num_pages: int = 64) -> None:
        cfg = model.cfg
        spec = KVCacheSpec(cfg.num_layers, num_pages, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
        self.cache = KVCache(spec)
        self.pool = PagePool(num_pages)
        self.runner = ModelRunner(model, self.cache)

    def start(self, prompt: list[int]) -> tuple[Request, torch.Tensor]:
        req = Request(list(prompt), SamplingParams())
        return req, self._run(req, len(prompt))

    def feed(self, req: Request, token: int) -> torch.Tensor:
        req.output_token_ids.append(token)
        return self._run(req, 1)

    def _run(self, req: Request, n: int) -> torch.Tensor:
        need = -(-(req.num_computed_tokens + n) // 16) - len(req.pages)
        if need > 0:
            req.pages.extend(self.pool.allocate(need))
        logits = self.runner.logits(ScheduledBatch([ScheduledSeq(req, n, True)]))
        req.num_computed_tokens += n
        return logits  # [n, V]

    def release(self, req: Request) -> None:
        self.pool.free(req.pages)
        req.pages = []


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation of `ids`: the next n token ids (the oracle)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
