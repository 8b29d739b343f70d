"""A request's life inside one engine, and the typed step contract.

Schedulers and runners meet only through `ScheduledBatch` (what to compute this step)
and `StepOutput` (what came out), so schedulers are tested on CPU with no model.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams

_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client cancel, deadline, or a failure elsewhere


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival: float = 0.0
    generator: torch.Generator | None = None
    draft_len: int = 0  # speculative decoding: tokens whose K/V sit in the draft model's cache

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building all of it (a decode step wants one
        token of a context that may be thousands long). 0 <= start <= end."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int  # tokens fed this step, starting at request.num_computed_tokens
    sample: bool  # False for a prefill chunk that does not reach the end of the prompt
    num_spec_tokens: int = 0  # speculative decoding: drafted tokens verified in this step


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class StepOutput:
    """One sampled token per scheduled seq with `sample=True`, in batch order."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    # speculative decoding: per sampled seq, the accepted drafts emitted before token_ids[i]
    spec_token_ids: list[list[int]] | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request (new tokens since the last output)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    new_logprobs: list[float] | None = None
    text: str = ""
