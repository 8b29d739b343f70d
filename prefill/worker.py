"""PrefillWorker (a Ray actor in the cluster).

Prompts from many requests are batched (and chunked when long) by the same scheduler as
the local engine, with max_tokens=1. When a prompt's last chunk has run, its pages are
copied out (before the scheduler frees them), the first token is returned to the router
at once, and the KV payload is pushed to the decode worker in the background.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import Future

import torch

from engine.loop import EngineLoop
from engine.request import ScheduledBatch, StepOutput
from engine.sampling import SamplingParams
from kvtransfer import faults
from kvtransfer.layout import KVTransferError, export_pages, make_header
from kvtransfer.ticket import RecentLegs, Ticket
from kvtransfer.worker_spec import WorkerSpec

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, worker_id: str, spec: WorkerSpec) -> None:
        self.worker_id, self.spec = worker_id, spec
        self.t_start = time.monotonic()
        self.engine = spec.build_engine(decode_graphs=False)
        self.engine.on_executed = self._export
        self.device = torch.device(spec.device)
        self.loop = EngineLoop(self.engine, lambda outputs: None)
        self._waiters: dict[str, Future] = {}  # request id -> (token, logprob, payload)
        self.early_aborts = RecentLegs()  # legs aborted before their prefill call arrived
        self._transfers: set[asyncio.Task] = set()
        self.sender = None
        self.prefilled = 0
        self.transfers_failed = 0
        self.transfers_ok = 0
        self.transfer_bytes = 0  # KV bytes pushed to decode workers (metrics)
        self.transfer_seconds = 0.0
        self.ready_s = 0.0

    async def start(self) -> dict:
        if self.spec.transport == "grpc":
            from kvtransfer.grpc_transport import GrpcKVSender

            self.sender = GrpcKVSender(self.spec.cluster_token)
        else:
            from kvtransfer.torch_transport import TorchKVSender

            self.sender = TorchKVSender(self.worker_id, self.device, self.spec.max_pairs,
                                        self.spec.transfer_timeout_s)
        self.loop.start()
        self.ready_s = time.monotonic() - self.t_start
        return {"worker_id": self.worker_id, "pid": os.getpid(), "ready_s": self.ready_s}

    async def stop(self) -> None:
        self.loop.stop()
        if self.sender is not None:
            await self.sender.close()

    # ---- engine thread ----

    def _export(self, batch: ScheduledBatch, out: StepOutput) -> None:
        i = 0
        for seq in batch.seqs:
            if not seq.sample:
                continue
            req = seq.request
            fut = self._waiters.get(req.request_id)
            if fut is not None and not fut.done():
                payload = export_pages(self.engine.cache, req.pages, len(req.prompt_token_ids))
                lp = out.logprobs[i] if out.logprobs is not None else None
                try:
                    fut.set_result((out.token_ids[i], lp, payload))
                except Exception:  # noqa: BLE001 - aborted meanwhile
                    pass
            i += 1

    # ---- requests ----

    def _first_token_finishes(self, token: int, params: SamplingParams, prompt_len: int) -> str | None:
        eos = () if params.ignore_eos else self.engine.scheduler.eos_token_ids
        if token in eos or token in params.stop_token_ids:
            return "stop"
        if params.max_tokens <= 1 or prompt_len + 1 >= self.engine.max_model_len:
            return "length"
        return None

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict,
                      ticket: dict, decode_handle=None) -> dict:
        """-> {"token", "logprob", "finish_reason"} as soon as the first token exists."""
        sp = SamplingParams(**params)
        if self.early_aborts.take(request_id):  # the router gave up while this call was queued
            return {"error": f"{request_id} was aborted before its prefill started", "code": "CANCELLED"}
        if len(self._waiters) >= self.spec.max_queue:  # bounded queue: refuse at once, never grow
            return {"error": f"prefill worker {self.worker_id} has {len(self._waiters)} prompts queued",
                    "code": "RESOURCE_EXHAUSTED"}
        fut: Future = Future()
        self._waiters[request_id] = fut
        one = dataclasses.replace(sp, max_tokens=1, stop=(), stop_token_ids=())
        try:
            await asyncio.wrap_future(self.loop.submit(self.engine.add_request, prompt_token_ids, one, request_id))
            if faults.PLAN is not None:
                await faults.ahit("prefill_running", self.worker_id, request_id)
            token, logprob, payload = await asyncio.wrap_future(fut)
        except Exception as e:
            self._waiters.pop(request_id, None)
            self.loop.submit(self.engine.abort, request_id)
            return {"error": f"prefill on {self.worker_id} failed: {e}", "code": "UNAVAILABLE"}
        finally:
            self._waiters.pop(request_id, None)
        self.prefilled += 1
        t = Ticket.from_dict(ticket, decode_handle)
        reason = self._first_token_finishes(token, sp, len(prompt_token_ids))
        if reason is not None:
            await self._cancel_on_decode(t, "finished at the first token")
        else:
            task = asyncio.create_task(self._transfer(t, token, logprob, payload))
            self._transfers.add(task)
            task.add_done_callback(self._transfers.discard)
        return {"token": token, "logprob": logprob, "finish_reason": reason}

    async def _transfer(self, ticket: Ticket, token: int, logprob, payload) -> None:
        try:
            if faults.PLAN is not None:
                await faults.ahit("transfer_started", self.worker_id, ticket.request_id)
            header = make_header(self.engine.cache, payload, ticket.request_id, ticket.ticket_id,
                                 ticket.num_tokens, token, logprob or 0.0, self.worker_id,
                                 with_checksum=self.device.type == "cpu")
            timeout = max(0.1, min(self.spec.transfer_timeout_s, ticket.deadline - time.time()))
            t0 = time.monotonic()
            await self.sender.send(ticket, header, payload, timeout)
            self.transfer_seconds += time.monotonic() - t0
            self.transfer_bytes += header.num_bytes
            self.transfers_ok += 1
        except (KVTransferError, asyncio.TimeoutError, Exception) as e:  # noqa: BLE001
            self.transfers_failed += 1
            log.warning("KV transfer for %s failed: %s", ticket.request_id, e)
            await self._cancel_on_decode(ticket, f"KV transfer failed: {e}")

    async def _cancel_on_decode(self, ticket: Ticket, reason: str) -> None:
        try:
            if ticket.decode_handle is not None:
                await asyncio.wait_for(ticket.decode_handle.cancel_ticket.remote(ticket.ticket_id, reason), 10)
        except Exception as e:  # noqa: BLE001 - the decode side also reaps expired tickets
            log.warning("could not cancel ticket %s: %s", ticket.ticket_id, e)

    async def abort(self, request_id: str) -> bool:
        fut = self._waiters.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(RuntimeError("aborted"))
        if fut is None:  # its prefill call may still be on its way, or arrive while we wait below
            self.early_aborts.note(request_id)
        found = await asyncio.wrap_future(self.loop.submit(self.engine.abort, request_id))
        if found:
            self.early_aborts.take(request_id)
        return found or fut is not None

    async def status(self) -> dict:
        s = await asyncio.wrap_future(self.loop.submit(self.loop.stats))
        s.update(worker_id=self.worker_id, role="prefill", pid=os.getpid(), ready_s=self.ready_s,
                 prefilled=self.prefilled, transfers_in_flight=len(self._transfers), waiters=len(self._waiters),
                 transfers_failed=self.transfers_failed, transfers_ok=self.transfers_ok,
                 transfer_bytes=self.transfer_bytes, transfer_seconds=self.transfer_seconds,
                 graph_steps=self.engine.runner.graph_steps(),
                 alive=self.loop.alive and self.loop.error is None)
        return s

    async def set_faults(self, spec: str) -> int:
        """Arm fault injection in this process (kvtransfer/faults.py); "" disarms."""
        return faults.install(spec)

    async def ping(self) -> bool:
        return self.loop.alive
