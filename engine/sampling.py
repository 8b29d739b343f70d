"""Sampling parameters and the sampler.

The sampler works on whole-batch tensors and never calls `.item()`: the step's tokens
come back as one tensor, read by the caller once per step. Each seeded request owns a
torch.Generator, so its random stream does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None, max_tokens_limit: int | None = None) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be at most {max_tokens_limit}, got {self.max_tokens}")
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {t}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0):
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                raise InvalidRequest(f"stop: each stop string must be 1..{MAX_STOP_STRING_LEN} characters")
        for tid in self.stop_token_ids:
            if not isinstance(tid, int) or tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise InvalidRequest(f"stop_token_ids: {tid} is not a token id of this model")


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, as tensors [B]."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    generators: list[torch.Generator | None]
    all_greedy: bool
    need_logprobs: bool
    filters: bool = field(default=False)

    @classmethod
    def build(cls, params: list[SamplingParams], generators, device) -> SamplingBatch:
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=t([p.temperature for p in params], torch.float32),
            top_k=t([p.top_k for p in params], torch.int64),
            top_p=t([p.top_p for p in params], torch.float32),
            min_p=t([p.min_p for p in params], torch.float32),
            generators=generators,
            all_greedy=all(p.greedy for p in params),
            need_logprobs=any(p.logprobs for p in params),
            filters=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params),
        )


def _filter(probs: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply top-k, top-p, min-p on sorted probabilities. -> (kept probs, vocab index) sorted."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.where(sb.top_k > 0, sb.top_k, probs.shape[-1])[:, None]
    drop = rank >= k
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above this token
    drop |= before >= sb.top_p[:, None]
    drop |= sorted_p < sb.min_p[:, None] * sorted_p[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return sorted_p.masked_fill(drop, 0.0), idx


def _exponential(shape, generators, device) -> torch.Tensor:
    rows = []
    for g in generators:
        rows.append(torch.empty(shape, device=device).exponential_(generator=g))
    return torch.stack(rows)


def sample(logits: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] float32 -> (token ids [B] int64, logprobs of those tokens [B] or None)."""
    greedy = logits.argmax(dim=-1)
    if sb.all_greedy:
        tokens = greedy
    else:
        temp = sb.temperature.clamp_min(1e-5)[:, None]
        probs = torch.softmax(logits / temp, dim=-1)
        if sb.filters:
            probs, idx = _filter(probs, sb)
        else:
            idx = None
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) samples i with prob p_i.
        noise = _exponential(probs.shape[-1], sb.generators, probs.device)
        choice = (probs / noise).argmax(dim=-1)
        sampled = choice if idx is None else idx.gather(1, choice[:, None]).squeeze(1)
        tokens = torch.where(sb.temperature == 0.0, greedy, sampled)
    logprobs = None
    if sb.need_logprobs:
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs
