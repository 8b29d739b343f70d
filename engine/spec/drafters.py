"""The drafter interface and the prompt-lookup (n-gram) drafter, which needs no model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from engine.request import Request

DRAFTERS = ("none", "ngram", "draft")


@dataclass
class Proposal:
    """Up to k drafted tokens per request, and the distributions they were drawn from."""

    tokens: list[list[int]]  # [B][<= k]
    probs: torch.Tensor | None = None  # [B, k, V] float32 q_j; None = deterministic (one-hot)


class Drafter(ABC):
    """Proposes continuations of running requests for the target to verify.

    `propose` sees each request with its K/V computed up to its last token
    (`num_computed_tokens == num_tokens - 1`) and pages reserved for k more positions.
    """

    name: str

    @abstractmethod
    def propose(self, requests: list[Request], k: int) -> Proposal:
        """-> at most k tokens per request, in order."""

    def capture(self, max_batch_size: int, max_model_len: int) -> None:
        """Capture CUDA graphs during warm-up (drafters that run a model); nothing by default."""
        return None


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the request's last n tokens
    (n from max_n down to min_n) and propose what followed it, extended periodically to k
    tokens. Pays off on text that repeats its context (code edits, summaries, extraction)."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, requests: list[Request], k: int) -> Proposal:
        return Proposal([self.lookup(r.all_token_ids, k) for r in requests])

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        seq = np.asarray(tokens, dtype=np.int64)
        length = len(seq)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)  # [L-n, n]
            hits = np.flatnonzero((windows == seq[length - n :]).all(axis=1))
            if hits.size:
                src = int(hits[-1]) + n  # first token after the match, < length
                out = list(tokens)
                for i in range(k):  # copying from a growing list repeats the found period
                    out.append(out[src + i])
                return out[length:]
        return []
