"""Continuous-batching scheduler over the page pool.

Each step: every running request gets one decode token (allocating a page when it
crosses a page boundary), then waiting requests are admitted with prompt chunks while
the token budget and pages last. A running request that cannot get a page preempts the
newest running request, which frees its pages and is later recomputed from scratch.
"""

from __future__ import annotations

from collections import deque

from engine.page_pool import PagePool, pages_needed
from engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    RequestStatus,
    ScheduledBatch,
    ScheduledSeq,
    StepOutput,
)


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 8192,
        page_size: int = 16,
        eos_token_ids: tuple[int, ...] = (),
        num_spec_tokens: int = 0,
    ) -> None:
        self.pool = pool
        self.num_spec_tokens = num_spec_tokens  # k drafted tokens per decode step (0 = off)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # ---- admission and removal ----

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Admit a request whose prompt K/V is already in `request.pages` (P/D hand-off)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----

    def schedule(self) -> ScheduledBatch:
        seqs: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if req not in self.running:  # preempted by an earlier iteration
                continue
            if req.num_computed_tokens < req.num_tokens - 1:
                n = min(req.num_tokens - req.num_computed_tokens, budget)  # recompute chunk
            else:
                n = 1
            spec = self._spec_len(req) if n == 1 and budget > self.num_spec_tokens else 0
            n += spec
            if n <= 0 or not self._reserve(req, req.num_computed_tokens + n):
                continue
            sample = req.num_computed_tokens + n - spec == req.num_tokens
            seqs.append(ScheduledSeq(req, n, sample, spec))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, req.num_computed_tokens + n, preempt=False):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(ScheduledSeq(req, n, req.num_computed_tokens + n == req.num_tokens))
            budget -= n
        return ScheduledBatch(seqs)

    def _spec_len(self, req: Request) -> int:
        """Drafts to verify for a decode step: k, or 0 where the verify rows would pass the
        context limit or the acceptance rule is not exact (logprobs, top-k/top-p/min-p asked).

        A request with one token left still verifies (the runner caps its drafts to 0): a
        batch of verify rows only stays one shape, which a CUDA graph replays; one plain
        decode row among them would send the whole step down the eager path."""
        k, p = self.num_spec_tokens, req.params
        if k == 0 or p.logprobs or p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
            return 0
        return 0 if req.num_tokens + k > self.max_model_len else k

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Make a running request hold pages for num_tokens from free pages only (no
        preemption); False when the pool is short. Its pages go back when it finishes."""
        return self._reserve(req, num_tokens, preempt=False)

    def _reserve(self, req: Request, num_tokens: int, preempt: bool = True) -> bool:
        """Make req hold pages for num_tokens, preempting the newest running request if needed."""
        need = pages_needed(num_tokens, self.page_size) - len(req.pages)
        while need > 0 and not self.pool.can_allocate(need):
            if not preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.pages.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req.pages)
        req.pages = []
        req.num_computed_tokens = 0
        req.draft_len = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def update(self, batch: ScheduledBatch, out: StepOutput) -> list[RequestOutput]:
        """Apply a step's results: advance, append sampled tokens, finish what is done."""
        results = []
        it = iter(range(len(out.token_ids)))
        for seq in batch.seqs:
            req = seq.request
            if not seq.sample:
                req.num_computed_tokens += seq.num_new_tokens
                continue
            i = next(it)
            if req.is_finished:  # aborted while the step ran: drop its token
                continue
            if seq.num_spec_tokens:
                results.append(self._update_spec(seq, out.spec_token_ids[i] + [out.token_ids[i]]))
                continue
            req.num_computed_tokens += seq.num_new_tokens
            token = out.token_ids[i]
            req.output_token_ids.append(token)
            lp = None
            if out.logprobs is not None and req.params.logprobs:
                lp = [out.logprobs[i]]
                req.output_logprobs.append(out.logprobs[i])
            reason = self.check_stop(req, token)
            if reason is not None:
                self._finish(req, reason)
            results.append(RequestOutput(req.request_id, [token], req.is_finished, req.finish_reason, lp))
        return results

    def _update_spec(self, seq: ScheduledSeq, tokens: list[int]) -> RequestOutput:
        """A verify step emitted the accepted drafts plus one token: append them up to a stop,
        then roll the KV back to what they cover (pages past it return to the pool)."""
        req = seq.request
        # K/V is valid for the fed token and the accepted drafts, not for the rejected ones
        req.num_computed_tokens += seq.num_new_tokens - seq.num_spec_tokens + len(tokens) - 1
        emitted = []
        for token in tokens:
            req.output_token_ids.append(token)
            emitted.append(token)
            reason = self.check_stop(req, token)
            if reason is not None:
                self._finish(req, reason)
                break
        if not req.is_finished:
            req.pages = self.pool.truncate(req.pages, req.num_computed_tokens, self.page_size)
            req.draft_len = min(req.draft_len, req.num_computed_tokens)
        return RequestOutput(req.request_id, emitted, req.is_finished, req.finish_reason)

    def check_stop(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Finish from outside (a stop string matched by the detokenizer)."""
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        if req.pages:
            self.pool.free(req.pages)
            req.pages = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason
        self.requests.pop(req.request_id, None)
