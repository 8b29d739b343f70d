"""DecodeWorker (a Ray actor in the cluster): reserve pages, receive KV, decode, stream outputs.

Threads: the engine steps on its own thread (EngineLoop); everything else runs on the
actor's asyncio loop. Engine state (pool, scheduler, cache) is touched only through
`loop.submit`, so a reservation, a commit and an abort never race with a step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass

import torch

from engine.loop import EngineLoop
from engine.page_pool import pages_needed
from engine.request import Request, RequestOutput
from engine.sampling import SamplingParams
from kvtransfer import faults
from kvtransfer.layout import (
    KVHeader,
    KVPayload,
    KVTransferError,
    import_pages,
    payload_from_bytes,
    payload_shapes,
    validate_header,
)
from kvtransfer.ticket import RecentLegs
from kvtransfer.worker_spec import WorkerSpec

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    ticket_id: str
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    pages: list[int]
    deadline: float


class DecodeWorker:
    def __init__(self, worker_id: str, spec: WorkerSpec, epoch: int = 0) -> None:
        self.worker_id, self.spec, self.epoch = worker_id, spec, epoch
        self.t_start = time.monotonic()
        self.ep = spec.connect_ep()  # an expert-parallel group's rank: steps in lockstep with it
        self.engine = spec.build_engine(ep=self.ep)
        self.device = torch.device(spec.device)
        self.loop = EngineLoop(self.engine, self._on_outputs, ep=self.ep)
        self.pending: dict[str, Reservation] = {}
        self.by_request: dict[str, str] = {}  # request id -> ticket id while pending
        self.early_aborts = RecentLegs()  # legs aborted before their reserve/submit arrived
        self._outbox: list[dict] = []
        self._wake: asyncio.Event | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._grpc_server = None
        self.grpc_address = ""
        self.store = None
        self.store_address = ""
        self.transfers_ok = 0
        self.transfers_failed = 0
        self.ready_s = 0.0

    # ---- lifecycle ----

    async def start(self) -> dict:
        self._aio = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.spec.transport == "grpc":
            from kvtransfer.grpc_transport import KVReceiverService, start_receiver_server

            svc = KVReceiverService(self._validate_header, self._commit_bytes, self._cancel_ticket,
                                    self.spec.cluster_token)
            self._grpc_server, self.grpc_address = await start_receiver_server(svc, self.spec.kv_bind_host())
        else:
            from kvtransfer.torch_transport import PairGroups, new_store

            self.store, self.store_address = new_store(self.spec.kv_bind_host())
            self.pairs = PairGroups(self.spec.max_pairs)
        self.loop.start()
        self._reaper = asyncio.create_task(self._reap_expired())
        self.ready_s = time.monotonic() - self.t_start
        return self.info()

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "grpc_address": self.grpc_address,
                "store_address": self.store_address, "pid": os.getpid(), "ready_s": self.ready_s}

    async def stop(self) -> None:
        self.loop.stop()
        if self._grpc_server is not None:
            await self._grpc_server.stop(1.0)

    # ---- admission ----

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: dict,
                      timeout_s: float) -> dict:
        """Reserve pages for the prompt's KV. -> ticket fields, or {"error": ..., "code": ...}."""
        n = pages_needed(len(prompt_token_ids), self.engine.cache.page_size)
        ticket_id = f"{self.worker_id}-t{next(self._ids)}"

        def alloc():
            return self._refusal(n, len(self.engine.scheduler.running) + len(self.pending)) or self.engine.pool.allocate(n)

        pages = await asyncio.wrap_future(self.loop.submit(alloc))
        if isinstance(pages, dict):
            return pages
        if self.early_aborts.take(request_id):  # the router gave up while this call waited
            await asyncio.wrap_future(self.loop.submit(self.engine.pool.free, pages))
            return {"code": "CANCELLED", "error": f"{request_id} was aborted before its pages were reserved"}
        deadline = time.time() + timeout_s
        self.pending[ticket_id] = Reservation(ticket_id, request_id, list(prompt_token_ids),
                                              SamplingParams(**params), pages, deadline)
        self.by_request[request_id] = ticket_id
        return {"ticket_id": ticket_id, "request_id": request_id, "decode_id": self.worker_id,
                "num_tokens": len(prompt_token_ids), "transport": "grpc" if self.grpc_address else "torch",
                "deadline": deadline, "grpc_address": self.grpc_address,
                "store_address": self.store_address, "epoch": self.epoch}

    def _refusal(self, n: int, held: int) -> dict | None:
        """Engine thread: why a prompt needing n pages cannot be admitted now, or None.

        held: requests this worker already holds. Bounded: over max_queue it refuses, never
        queues. Every running request keeps room for its next page, so admission never
        forces a preemption."""
        if held >= self.spec.max_queue:
            return {"code": "RESOURCE_EXHAUSTED",
                    "error": f"decode worker {self.worker_id} holds its limit of {self.spec.max_queue} requests"}
        if not self.engine.pool.can_allocate(n + len(self.engine.scheduler.running)):
            return {"code": "RESOURCE_EXHAUSTED", "error": f"decode worker {self.worker_id} has no room for {n} KV pages"}
        return None

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: dict) -> dict:
        """Colocated mode: prefill and decode here. Outputs, first token included, go out through poll.

        -> {} once queued, or {"error": ..., "code": ...} when there is no room for the prompt.
        """
        n = pages_needed(len(prompt_token_ids) + 1, self.engine.cache.page_size)

        if self.early_aborts.take(request_id):
            return {"code": "CANCELLED", "error": f"{request_id} was aborted before it was submitted"}

        def add():
            sched = self.engine.scheduler
            refusal = self._refusal(n, len(sched.running) + len(sched.waiting))
            if refusal is None:
                self.engine.add_request(prompt_token_ids, SamplingParams(**params), request_id=request_id)
            return refusal or {}

        return await asyncio.wrap_future(self.loop.submit(add))

    # ---- receiving ----

    def _validate_header(self, h: KVHeader) -> None:
        res = self.pending.get(h.ticket_id)
        if res is None:
            raise KVTransferError(f"unknown or expired ticket {h.ticket_id}")
        if res.request_id != h.request_id:
            raise KVTransferError(f"ticket {h.ticket_id} belongs to {res.request_id}, not {h.request_id}")
        validate_header(h, self.engine.cache, len(res.prompt_token_ids))

    async def _commit_bytes(self, h: KVHeader, blob: bytes) -> None:
        await self._commit(h, payload_from_bytes(self.engine.cache, h.num_tokens, blob))

    async def _commit(self, h: KVHeader, payload: KVPayload) -> None:
        """Hand received KV to the engine thread and return without waiting for it.

        The import and admission run at the engine's next step boundary; the sender is
        released now. Waiting for the commit made every transfer on a pair wait for a step
        to end, so a burst of prompts joined the decode batch one per step (on the 2-core
        CPU, 16 prompts took 16 steps of ~160 ms to be admitted). Once the ticket is popped
        here an abort no longer cancels it: it reaches the engine after the commit (the
        engine thread runs commands in order) and finishes the admitted request. A failed
        commit frees the pages and tells the router itself, naming this worker so that the
        retry goes elsewhere."""
        if faults.PLAN is not None:
            try:
                await faults.ahit("decode_receiving", self.worker_id, h.request_id)
            except faults.InjectedFault as e:
                raise KVTransferError(str(e)) from e
        res = self.pending.pop(h.ticket_id, None)
        if res is None:
            raise KVTransferError(f"ticket {h.ticket_id} expired before commit")
        self.by_request.pop(res.request_id, None)

        def commit():
            try:
                import_pages(self.engine.cache, res.pages, payload)
                req = Request(res.prompt_token_ids, res.params, request_id=res.request_id,
                              output_token_ids=[h.first_token], pages=res.pages,
                              num_computed_tokens=len(res.prompt_token_ids), arrival=time.monotonic())
                if not res.params.greedy and req.generator is not None:
                    # the prefill worker drew once from this seed for the first token
                    torch.empty(self.engine.model_config.vocab_size).exponential_(generator=req.generator)
                self.engine.scheduler.add_running(req)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory importing the pages
                self.transfers_failed += 1
                self.engine.pool.free(res.pages)
                log.warning("KV commit of %s failed: %s", res.request_id, e)
                # the ticket is gone, so no later cancel would reach the router: tell it now
                self._publish_error(res.request_id, f"KV commit failed: {type(e).__name__}: {e}")
                return
            self.transfers_ok += 1
            # on the engine thread, so the router hears of the commit before any step output
            self._publish([{"request_id": res.request_id, "token_ids": [], "logprobs": None,
                            "finished": False, "finish_reason": None, "committed": True}])

        fut = self.loop.submit(commit)
        if fut.done() and fut.exception() is not None:  # the engine loop is down: nothing will run it
            self._publish_error(res.request_id, f"decode worker {self.worker_id} cannot commit: {fut.exception()}")
            raise KVTransferError(f"KV commit on {self.worker_id} refused: {fut.exception()}")

    def _publish_error(self, request_id: str, error: str) -> None:
        """End request_id with an error that names this worker (the router's retry avoids it)."""
        self._publish([{"request_id": request_id, "token_ids": [], "logprobs": None, "finished": True,
                        "finish_reason": "error", "worker": self.worker_id, "error": error}])

    def _cancel_ticket(self, ticket_id: str, reason: str) -> bool:
        """Drop a reservation (transfer failed, timed out, or the request was aborted)."""
        res = self.pending.pop(ticket_id, None)
        if res is None:
            return False
        self.by_request.pop(res.request_id, None)
        self.transfers_failed += 1
        self.loop.submit(self.engine.pool.free, res.pages)
        self._publish([{"request_id": res.request_id, "token_ids": [], "logprobs": None,
                        "finished": True, "finish_reason": "abort", "error": reason}])
        return True

    async def cancel_ticket(self, ticket_id: str, reason: str = "cancelled") -> bool:
        return self._cancel_ticket(ticket_id, reason)

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for tid in [t for t, r in self.pending.items() if r.deadline < now]:
                self._cancel_ticket(tid, "KV transfer timed out")

    # torch.distributed transport: the prefill side calls these through Ray.

    async def open_pair(self, key: str) -> bool:
        from kvtransfer.torch_transport import RECEIVER, make_pair_group

        g = await asyncio.to_thread(make_pair_group, self.store, key, RECEIVER, self.device,
                                    self.spec.transfer_timeout_s)
        self.pairs.put(key, g)
        return True

    async def check_header(self, header: dict) -> str:
        """Validate a header before the sender moves any byte. -> "" or the reason."""
        try:
            self._validate_header(KVHeader.from_dict(header))
        except KVTransferError as e:
            return str(e)
        return ""

    async def recv_transfer(self, key: str, header: dict, tag: int, timeout_s: float) -> str:
        """Post the receive for one transfer, validate, commit. -> "" or an error message."""
        from kvtransfer.torch_transport import recv_tensors

        h = KVHeader.from_dict(header)
        try:
            try:
                self._validate_header(h)
            except KVTransferError:
                await self._drain_refused(key, h, tag, timeout_s)
                raise
            group = self.pairs.get(key)
            if group is None:
                raise KVTransferError(f"no pairwise group {key}")
            shapes = payload_shapes(self.engine.cache, h.num_tokens)
            tensors = await asyncio.to_thread(recv_tensors, group, shapes, self.device, tag, timeout_s)
            payload = KVPayload.from_tensors(tensors)
            if h.checksum:
                from kvtransfer.layout import checksum

                if checksum(payload) != h.checksum:
                    raise KVTransferError("checksum mismatch")
            await self._commit(h, payload)
        except Exception as e:  # noqa: BLE001 - reported to the sender, pages released
            if isinstance(e, KVTransferError) is False:
                self.pairs.drop(key)
            self._cancel_ticket(h.ticket_id, str(e))
            return str(e) or type(e).__name__
        return ""

    async def _drain_refused(self, key: str, h: KVHeader, tag: int, timeout_s: float) -> None:
        """The sender's pre-check passed (its send is coming) but the ticket is gone by now
        (reaped, aborted): receive the bytes into scratch and drop them. Unmatched, an NCCL
        send would wait for the group's timeout, whose watchdog may then end the process."""
        from kvtransfer.torch_transport import recv_tensors

        group = self.pairs.get(key)
        try:  # the shape must be one this cache could take, whatever ticket it was for
            validate_header(h, self.engine.cache)
        except KVTransferError:
            return
        if group is None or not 0 < h.num_tokens <= self.engine.model_config.max_position:
            return
        try:
            await asyncio.to_thread(recv_tensors, group, payload_shapes(self.engine.cache, h.num_tokens),
                                    self.device, tag, timeout_s)
        except Exception:  # noqa: BLE001 - the group is suspect now
            self.pairs.drop(key)

    # ---- running requests ----

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: one message per step for the whole batch."""
        items = [
            {"request_id": o.request_id, "token_ids": o.new_token_ids, "logprobs": o.new_logprobs,
             "finished": o.finished, "finish_reason": o.finish_reason.value if o.finish_reason else None}
            for o in outputs
        ]
        if faults.PLAN is not None:
            items = [self._running_fault(i) for i in items]
        self._publish(items)

    def _running_fault(self, item: dict) -> dict:
        """Engine thread: the decode_running fault point (a `fail` ends that request with an error)."""
        if item["finished"]:
            return item
        try:
            faults.hit("decode_running", self.worker_id, item["request_id"])
        except faults.InjectedFault as e:
            self.engine.abort(item["request_id"])
            return {**item, "token_ids": [], "finished": True, "finish_reason": "error", "error": str(e)}
        return item

    def _publish(self, items: list[dict]) -> None:
        def put():
            self._outbox.extend(items)
            self._wake.set()

        if self._aio is not None:
            self._aio.call_soon_threadsafe(put)

    async def poll(self, max_wait_s: float = 1.0) -> list[dict]:
        """Long-poll: every output since the last call, waiting up to max_wait_s for one."""
        if not self._outbox:
            try:
                await asyncio.wait_for(self._wake.wait(), max_wait_s)
            except asyncio.TimeoutError:
                pass
        self._wake.clear()
        out, self._outbox = self._outbox, []
        return out

    async def abort(self, request_id: str) -> bool:
        tid = self.by_request.get(request_id)
        if tid is not None:
            return self._cancel_ticket(tid, "aborted")
        # Noted before the engine is asked: a reserve still waiting for its pages, or one that
        # arrives meanwhile, finds the note and is refused. Forgotten if the engine had it.
        self.early_aborts.note(request_id)
        found = await asyncio.wrap_future(self.loop.submit(self.engine.abort, request_id))
        if found:
            self.early_aborts.take(request_id)
        return found

    async def status(self) -> dict:
        s = await asyncio.wrap_future(self.loop.submit(self.loop.stats))
        s.update(self.info(), role="decode", pending_transfers=len(self.pending), by_request=len(self.by_request),
                 transfers_ok=self.transfers_ok, transfers_failed=self.transfers_failed,
                 graph_steps=self.engine.runner.graph_steps(),
                 alive=self.loop.alive and self.loop.error is None)
        return s

    async def set_faults(self, spec: str) -> int:
        """Arm fault injection in this process (kvtransfer/faults.py); "" disarms."""
        return faults.install(spec)

    async def ping(self) -> bool:
        return self.loop.alive
