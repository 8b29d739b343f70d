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


def spy_gemvs(monkeypatch, calls: list) -> None:
    """Wrap kernels.gemv's entry points (gemv, gemv_add_rmsnorm, gemv_add, gemv_rmsnorm_sums):
    each call, as the engine makes it (positional), appends (rows, gated, name) to calls."""
    import kernels.gemv as g  # lazy: importing kernels fixes TRITON_INTERPRET for the process

    gated_args = {"gemv": 2, "gemv_add_rmsnorm": 5, "gemv_add": None, "gemv_rmsnorm_sums": 5}
    for name, at in gated_args.items():  # `at`: where `gated` is among the args after x
        def call(x, *args, _real=getattr(g, name), _name=name, _at=at):
            calls.append((x.shape[0], False if _at is None else bool(args[_at]), _name))
            return _real(x, *args)

        monkeypatch.setattr(g, name, call)


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation of `ids`: the next n token ids (the oracle)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def save_tiny_qwen3_moe(path, base, top_k: int, **sizes):
    """A random-weight HF Qwen3-MoE with `base`'s vocabulary and special tokens, saved to path
    (beside the tokenizer files already there); -> the HF model, EOS off for fixed lengths."""
    import transformers

    torch.manual_seed(5)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=base.vocab_size, num_hidden_layers=2, num_experts_per_tok=top_k, initializer_range=0.2,
        max_position_embeddings=512, bos_token_id=base.bos_token_id, eos_token_id=list(base.eos_token_ids),
        **sizes)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(path)
    hf.generation_config.eos_token_id = None
    return hf
