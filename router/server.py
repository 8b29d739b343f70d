"""The router: a grpc.aio server in front of the prefill and decode pools.

One request: validate -> tokenize -> pick D (free pages, batch) -> D reserves pages and
issues a ticket -> pick P (queue) -> P prefills and returns the first token (streamed at
once: that is TTFT) while it pushes KV to D -> D's per-step outputs arrive through one
long-poll per decode worker and are fanned out to client streams. Cancel, deadline or
failure: both legs are told, and the client gets a final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import InvalidRequest
from engine.page_pool import pages_needed
from engine.sampling import SamplingParams
from engine.textstream import TextStream
from engine.tokenizer import TextTokenizer
from kvtransfer import faults
from kvtransfer.ticket import RecentLegs
from protos.miniinfer.v1 import miniinfer_pb2 as pb
from protos.miniinfer.v1 import miniinfer_pb2_grpc as pb_grpc
from router.policy import DecodeView, PrefillView, choose_decode, choose_prefill
from router.security import TokenAuth, add_service, server_credentials
from router.validate import Limits, check_request_id, prompt_ids_from_pb, sampling_from_pb
from router.workers import DEAD, READY, STARTING, WorkerTable, call

log = logging.getLogger(__name__)

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
          "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}
STATES = {"STARTING": pb.WORKER_STATE_STARTING, "READY": pb.WORKER_STATE_READY,
          "DRAINING": pb.WORKER_STATE_DRAINING, "DEAD": pb.WORKER_STATE_DEAD}
SERVICE_NAME = "miniinfer.v1.MiniInfer"


@dataclass
class RouterConfig:
    model: str
    kv_dtype: str
    transport: str
    request_timeout_s: float = 300.0
    transfer_timeout_s: float = 30.0
    call_timeout_s: float = 30.0
    max_active_requests: int = 1024
    status_interval_s: float = 0.5
    poll_wait_s: float = 0.5
    max_retries: int = 2  # re-prefills (another prefill worker, or migration to another decode worker)
    colocated: bool = False  # decode workers prefill their own prompts (no prefill pool, no transfer)


@dataclass
class Active:
    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    decode_id: str = ""
    prefill_id: str = ""
    prefilled: bool = False
    leg_id: str = ""  # the id the workers know this attempt by: "<id>~<n>", then "<id>~<n>#retryN"
    transferred: bool = False  # the decode worker committed this attempt's KV
    attempts: int = 0
    excluded: set = field(default_factory=set)  # workers that failed this request: not picked again
    aborted: bool = False  # the Abort RPC named it: a lost attempt is not retried

    def __post_init__(self) -> None:
        self.leg_id = self.leg_id or self.request_id


def _abort_item() -> dict:
    """The last output item of a request ended by Abort."""
    return {"token_ids": [], "logprobs": None, "finished": True, "finish_reason": "abort"}


class LegLost(Exception):
    """A worker of this attempt died or failed it: the router may re-prefill elsewhere."""


class LegError(Exception):
    """A worker leg failed: carries the gRPC status the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Router:
    def __init__(self, config: RouterConfig, tokenizer: TextTokenizer, limits: Limits,
                 table: WorkerTable) -> None:
        self.config, self.tokenizer, self.limits, self.table = config, tokenizer, limits, table
        self.active: dict[str, Active] = {}
        self.legs: dict[str, Active] = {}  # worker-side request id (one per attempt) -> its request
        self.retries = 0  # re-prefills after a lost leg (status, tests)
        self._pollers: dict[str, asyncio.Task] = {}
        self._bg: list[asyncio.Task] = []
        self._stopped = False
        self._aborts: set[asyncio.Task] = set()  # aborts sent from where no one could wait for them
        self._aborted = RecentLegs(ttl_s=1.0)  # legs whose workers were told to drop them, lately
        self._leg_seq = itertools.count(1)
        self.orphans_reaped = 0  # legs a worker ran that no request here owned (status, tests)
        self.health: health.aio.HealthServicer | None = None
        self.requests_total = 0
        self.controller = None  # cluster/controller.py: ApplyConfig and pool status (None: fixed pools)
        self.metrics = None  # cluster/metrics.py: request latency histograms (None: no endpoint)

    # ---- background: status refresh and per-decode-worker long-polls ----

    async def start(self) -> None:
        await self.table.refresh()
        self._bg.append(asyncio.create_task(self._refresh_loop()))
        self.ensure_pollers()

    async def stop(self) -> None:
        # The flag, not only the cancel: before Python 3.12, asyncio.wait_for swallows a
        # cancel that lands as its inner call completes, and a poller would then go on.
        self._stopped = True
        tasks = [*self._bg, *self._pollers.values()]
        for t in tasks:
            t.cancel()
        tasks += list(self._aborts)  # aborts already sent: let their answers come (bounded)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def ensure_pollers(self) -> None:
        for w in self.table.pool("decode"):
            if w.worker_id not in self._pollers and w.state not in (DEAD, STARTING):
                self._pollers[w.worker_id] = asyncio.create_task(self._poll(w.worker_id))

    async def _refresh_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.config.status_interval_s)
            try:
                await self.table.refresh()
            except Exception:  # noqa: BLE001 - keep refreshing
                log.exception("status refresh failed")
            self._fail_dead()
            await self._update_health()

    async def _update_health(self) -> None:
        if self.health is None:
            return
        roles = ("decode",) if self.config.colocated else ("prefill", "decode")
        ok = all(any(w.ready for w in self.table.pool(role)) for role in roles)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def forget(self, worker_id: str) -> None:
        """A worker leaves the table: stop polling it; requests still on it (if dead) fail now."""
        t = self._pollers.pop(worker_id, None)
        if t is not None:
            t.cancel()
        self._fail_dead()

    def _fail_dead(self) -> None:
        """Requests on a dead worker get an error at once instead of waiting for their deadline."""
        dead = {w.worker_id for w in self.table.workers.values() if w.state == DEAD}
        for a in self.active.values():
            if a.decode_id in dead or (a.prefill_id in dead and not a.transferred):
                wid = a.decode_id if a.decode_id in dead else a.prefill_id
                a.queue.put_nowait({"finished": True, "finish_reason": "error", "worker": wid,
                                    "error": f"worker {wid} died"})

    async def _poll(self, worker_id: str) -> None:
        w = self.table.get(worker_id)
        while w is not None and w.state != DEAD and not self._stopped:
            try:
                items = await call(w.handle.poll.remote(self.config.poll_wait_s), self.config.call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("poll of %s failed: %s", worker_id, e)
                w.state = DEAD
                self._fail_dead()
                break
            for item in items:
                a = self.legs.get(item["request_id"])
                if a is not None and a.leg_id == item["request_id"]:  # stale attempts are dropped
                    a.queue.put_nowait(item)
                elif a is None and not item.get("finished"):
                    self._reap_orphan(w, item["request_id"])
            w = self.table.get(worker_id)
        self._pollers.pop(worker_id, None)

    def _reap_orphan(self, w, leg: str) -> None:
        """A worker steps a leg no request here owns (its abort was lost in a race): drop it.

        The backstop behind every abort path: whatever went wrong, a running leg with no
        client costs at most one poll round before its pages go back. Outputs already on
        their way when a leg was aborted do not count: every abort is noted, and a leg is
        an orphan only if it still steps a second after its last abort. At most one abort
        per leg a second, and the memory of them stays bounded."""
        if self._aborted.seen(leg):
            return
        self.orphans_reaped += 1
        log.warning("worker %s is running %s, which no request owns: aborting it", w.worker_id, leg)
        self._aborted.note(leg)
        try:
            self._spawn_abort(call(w.handle.abort.remote(leg), self.config.call_timeout_s))
        except Exception as e:  # noqa: BLE001 - never let the poller die of it
            log.warning("could not abort %s on %s: %s", leg, w.worker_id, e)

    # ---- one request ----

    def _deadline(self, context) -> float:
        remaining = context.time_remaining() if context is not None else None
        budget = self.config.request_timeout_s if remaining is None else min(remaining, self.config.request_timeout_s)
        return time.monotonic() + budget

    @staticmethod
    async def _within(aw, deadline: float, what: str):
        left = deadline - time.monotonic()
        if left <= 0:
            if asyncio.iscoroutine(aw):
                aw.close()  # never started: close it, or Python warns it was never awaited
            raise asyncio.TimeoutError(what)
        try:
            return await asyncio.wait_for(aw, left)
        except asyncio.TimeoutError:
            if time.monotonic() < deadline - 0.05:
                # the worker call's own bound ran out, not the request's deadline: the worker is
                # stuck, so this attempt is lost (the caller excludes it and may retry elsewhere)
                raise LegLost(f"{what}: the worker did not answer in time") from None
            raise asyncio.TimeoutError(what) from None

    def _pick_decode(self, prompt_len: int, exclude: set = frozenset()):
        views = [DecodeView(w.worker_id, w.ready and w.worker_id not in exclude, w.status.get("pages_free", 0),
                            w.status.get("running", 0), w.inflight) for w in self.table.pool("decode")]
        wid = choose_decode(views, pages_needed(prompt_len + 1))
        return None if wid is None else self.table.get(wid)

    def _pick_prefill(self, exclude: set = frozenset()):
        views = [PrefillView(w.worker_id, w.ready and w.worker_id not in exclude, w.inflight)
                 for w in self.table.pool("prefill")]
        wid = choose_prefill(views)
        return None if wid is None else self.table.get(wid)

    def admit(self, rid: str) -> Active:
        # The workers know it by a router-unique id, never the client's own: a client that
        # reuses an id (say, after a deadline) can never receive or abort the old leg's output.
        a = self.active[rid] = Active(rid, leg_id=f"{rid}~{next(self._leg_seq)}")
        self.legs[a.leg_id] = a
        return a

    def release(self, rid: str) -> None:
        a = self.active.pop(rid, None)
        if a is not None:
            self.legs.pop(a.leg_id, None)

    async def run(self, rid: str, ids: list[int], params: SamplingParams, deadline: float):
        """Async generator of output dicts for one admitted request. Raises LegError.

        A lost leg (a worker died, or failed the prefill, the transfer or a decode step) is
        retried up to `max_retries` times with the prompt plus every token already streamed,
        on workers that have not failed this request: the stream goes on with no token
        repeated or missing. With no worker left: UNAVAILABLE."""
        a = self.active[rid]
        emitted: list[int] = []
        while True:
            rest = replace(params, max_tokens=params.max_tokens - len(emitted))
            try:
                async for item in self._attempt(a, ids + emitted, rest, deadline):
                    emitted.extend(item["token_ids"])
                    yield item
                return
            except LegLost as e:
                await self._drop_leg(a)
                if a.aborted:  # the attempt was lost because Abort took its legs down
                    yield _abort_item()
                    return
                a.attempts += 1
                self.retries += 1
                if a.attempts > self.config.max_retries:
                    raise LegError(grpc.StatusCode.UNAVAILABLE, f"{e}; gave up after {a.attempts} attempts") from None
                log.warning("request %s: %s; re-prefilling %d+%d tokens (attempt %d)",
                            rid, e, len(ids), len(emitted), a.attempts + 1)

    async def _drop_leg(self, a: Active) -> None:
        """Free the lost attempt's pages wherever its workers still answer; forget its id."""
        await self.abort_legs(a.request_id)
        self.legs.pop(a.leg_id, None)

    async def _attempt(self, a: Active, ids: list[int], params: SamplingParams, deadline: float):
        cfg = self.config
        if a.attempts:
            a.leg_id = f"{a.leg_id.split('#', 1)[0]}#retry{a.attempts}"
            a.queue = asyncio.Queue()  # items of the lost attempt must not leak into this one
        a.decode_id = a.prefill_id = ""
        a.prefilled = a.transferred = False
        self.legs[a.leg_id] = a
        leg = a.leg_id
        d = self._pick_decode(len(ids), a.excluded)
        if d is None:
            code = grpc.StatusCode.UNAVAILABLE if a.attempts else grpc.StatusCode.RESOURCE_EXHAUSTED
            raise LegError(code, "no decode worker has room for this prompt")
        a.decode_id = d.worker_id
        d.inflight += 1
        try:
            pdict = asdict(params)
            try:
                ticket = await self._within(call(d.handle.reserve.remote(leg, ids, pdict, cfg.transfer_timeout_s),
                                                 cfg.call_timeout_s), deadline, "reserving KV pages")
            except asyncio.TimeoutError:
                raise
            except Exception as e:  # noqa: BLE001 - the decode worker is gone
                a.excluded.add(d.worker_id)
                raise LegLost(f"decode worker {d.worker_id} failed: {type(e).__name__}") from None
            if "error" in ticket:
                if a.aborted:  # the Abort RPC overtook the reserve, which the worker then refused
                    yield _abort_item()
                    return
                raise LegError(grpc.StatusCode.RESOURCE_EXHAUSTED, ticket["error"])
            first = await self._prefill(a, ids, pdict, ticket, d, deadline)
            reason = first["finish_reason"]
            yield {"token_ids": [first["token"]], "logprobs": None if first["logprob"] is None else [first["logprob"]],
                   "finished": reason is not None, "finish_reason": reason}
            if reason is not None:
                return
            while True:
                item = await self._within(a.queue.get(), deadline, "decode")
                if item.get("error"):
                    if a.transferred and item.get("worker") == a.prefill_id:
                        continue  # the prefill worker died after its KV had landed: nothing lost
                    if item.get("worker"):
                        a.excluded.add(item["worker"])
                    raise LegLost(item["error"])
                a.transferred = True
                if item.get("committed"):
                    continue
                yield item
                if item["finished"]:
                    return
        finally:
            d.inflight -= 1

    async def _prefill(self, a: Active, ids: list[int], pdict: dict, ticket: dict, d, deadline: float) -> dict:
        """Run the prefill leg of one attempt. -> the first token, or raises LegError/LegLost."""
        p = self._pick_prefill(a.excluded)
        if p is None:
            raise LegError(grpc.StatusCode.UNAVAILABLE, "no prefill worker is ready")
        a.prefill_id = p.worker_id
        p.inflight += 1
        try:
            first = await self._within(call(p.handle.prefill.remote(a.leg_id, ids, pdict, ticket, d.handle),
                                            self.config.request_timeout_s), deadline, "prefill")
        except asyncio.TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - the prefill worker is gone
            a.excluded.add(p.worker_id)
            raise LegLost(f"prefill worker {p.worker_id} failed: {type(e).__name__}") from None
        finally:
            p.inflight -= 1
        a.prefilled = True
        if "error" in first:
            if first.get("code") == "RESOURCE_EXHAUSTED":
                raise LegError(grpc.StatusCode.RESOURCE_EXHAUSTED, first["error"])
            a.excluded.add(p.worker_id)
            raise LegLost(first["error"])
        return first

    async def run_colocated(self, rid: str, ids: list[int], params: SamplingParams, deadline: float):
        """Colocated mode: one worker prefills and decodes; every token comes through its poll stream."""
        a = self.active[rid]
        d = self._pick_decode(len(ids))
        if d is None:
            raise LegError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no worker has room for this prompt")
        a.decode_id = d.worker_id
        d.inflight += 1
        try:
            try:
                res = await self._within(call(d.handle.submit.remote(a.leg_id, ids, asdict(params)),
                                              self.config.call_timeout_s), deadline, "admission")
            except LegLost as e:  # colocated mode has no migration: the request fails here
                raise LegError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
            if "error" in res:
                if a.aborted:  # the Abort RPC overtook the submit, which the worker then refused
                    yield _abort_item()
                    return
                raise LegError(grpc.StatusCode[res.get("code", "RESOURCE_EXHAUSTED")], res["error"])
            a.prefilled = True
            while True:
                item = await self._within(a.queue.get(), deadline, "generation")
                if item.get("error"):
                    raise LegError(grpc.StatusCode.UNAVAILABLE, item["error"])
                yield item
                if item["finished"]:
                    return
        finally:
            d.inflight -= 1

    async def abort_legs(self, rid: str) -> None:
        a = self.active.get(rid)
        if a is not None:
            await self._abort_calls(a)

    def _abort_calls(self, a: Active):
        """Send the abort of a's current leg to its workers now. -> an awaitable of the answers."""
        self._aborted.note(a.leg_id)
        calls = []
        for wid in {a.decode_id, a.prefill_id} - {""}:
            w = self.table.get(wid)
            if w is not None and w.state != DEAD:
                calls.append(call(w.handle.abort.remote(a.leg_id), self.config.call_timeout_s))
        return asyncio.gather(*calls, return_exceptions=True)

    def abort_soon(self, a: Active) -> None:
        """Abort a's legs from where nothing can wait (a stream closed under its handler)."""
        self._spawn_abort(self._abort_calls(a))

    def _spawn_abort(self, aw) -> None:
        t = asyncio.ensure_future(aw)
        self._aborts.add(t)
        t.add_done_callback(self._aborts.discard)
        t.add_done_callback(lambda t: t.cancelled() or t.exception())  # answers are not needed


async def _streaming_fault(rid: str) -> None:
    """The router_streaming fault point. The router is the test's own process: kill acts as fail."""
    try:
        await faults.ahit("router_streaming", "router", rid, can_kill=False)
    except faults.InjectedFault as e:
        raise LegError(grpc.StatusCode.UNAVAILABLE, str(e)) from None


class MiniInferService(pb_grpc.MiniInferServicer):
    def __init__(self, router: Router) -> None:
        self.r = router

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        r = self.r
        t0 = time.monotonic()
        if request.model and request.model != r.config.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"model: unknown model {request.model!r}; this cluster serves {r.config.model!r}")
        try:
            ids = prompt_ids_from_pb(request, r.tokenizer, r.limits)
            params = sampling_from_pb(request.sampling, r.limits)
            check_request_id(request.request_id, r.limits)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        if rid in r.active:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: {rid!r} is already active")
        if len(r.active) >= r.config.max_active_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"router is at its limit of {r.config.max_active_requests} active requests")
        deadline = r._deadline(context)
        a = r.admit(rid)
        r.requests_total += 1
        eos = () if params.ignore_eos else r.tokenizer.eos_token_ids
        stream = TextStream(r.tokenizer, ids, params.stop, eos)
        n_out, status, first = 0, None, True
        settled = False  # the workers are done with this request, or have been told to drop it
        try:
            leg = r.run_colocated if r.config.colocated else r.run
            async with contextlib.aclosing(leg(rid, ids, params, deadline)) as items:
                async for item in items:
                    text = stream.push(item["token_ids"], item["finished"])
                    n_out += len(item["token_ids"])
                    finished, reason = item["finished"], item["finish_reason"]
                    if stream.stopped and not finished:
                        await r.abort_legs(rid)
                        finished, reason = True, "stop"
                    msg = pb.GenerateResponse(request_id=rid, token_ids=item["token_ids"], text=text,
                                              logprobs=item.get("logprobs") or [])
                    if faults.PLAN is not None:
                        await _streaming_fault(rid)
                    if first:
                        t_first = time.monotonic()
                        msg.ttft_s, first = t_first - t0, False
                    if finished:
                        settled = True
                        msg.finish_reason = FINISH.get(reason, pb.FINISH_REASON_STOP)
                        msg.usage.prompt_tokens, msg.usage.completion_tokens = len(ids), n_out
                        msg.e2e_s = time.monotonic() - t0
                        if r.metrics is not None:
                            r.metrics.observe_request(t_first - t0, msg.e2e_s, n_out, reason or "stop")
                    yield msg
                    if finished:
                        break
        except LegError as e:
            status = (e.code, str(e))
        except asyncio.TimeoutError as e:
            status = (grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded during {e}")
        except Exception as e:  # noqa: BLE001 - never leave legs running behind an INTERNAL
            log.exception("request %s failed", rid)
            status = (grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        finally:
            # Every way out that is not a finished stream tells both legs, at once and without
            # waiting: an error, a cancel, and also a stream closed under this handler (the
            # client's deadline passing while a message was being written ends it at the
            # `yield`, with no exception of its own to catch).
            try:
                if not settled:
                    r.abort_soon(a)
            finally:
                r.release(rid)
        if status is not None:
            if r.metrics is not None:
                r.metrics.observe_failure(status[0].name)
            await context.abort(*status)

    async def Abort(self, request, context):  # noqa: N802
        found = request.request_id in self.r.active
        a = self.r.active.get(request.request_id)
        if a is not None:
            a.aborted = True  # before the legs go: their failure must not start a retry
        await self.r.abort_legs(request.request_id)
        a = self.r.active.get(request.request_id)
        if a is not None:
            a.queue.put_nowait(_abort_item())
        return pb.AbortResponse(found=found)

    async def Tokenize(self, request, context):  # noqa: N802
        r = self.r
        try:
            kind = request.WhichOneof("input")
            if kind == "messages":
                text = r.tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                                        for m in request.messages.messages])
            elif kind == "prompt":
                text = request.prompt
            else:
                raise InvalidRequest("input: set prompt or messages")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=r.tokenizer.encode(text), text=text)

    async def GetClusterStatus(self, request, context):  # noqa: N802
        r = self.r
        await r.table.refresh()
        out = pb.ClusterStatus(model=r.config.model, kv_dtype=r.config.kv_dtype, kv_page_size=16,
                               kv_transport=r.config.transport, max_model_len=r.limits.max_model_len,
                               queue_depth=sum(w.inflight for w in r.table.pool("prefill")),
                               active_requests=len(r.active))
        for role in ("prefill", "decode"):
            pool = out.pools.add(name=role, desired_replicas=len(r.table.pool(role)))
            for w in r.table.pool(role):
                s = w.status
                pool.workers.add(worker_id=w.worker_id, state=STATES[w.state],
                                 address=w.info.get("grpc_address", ""),
                                 pages_total=s.get("pages_total", 0), pages_free=s.get("pages_free", 0),
                                 pages_used=s.get("pages_used", 0), running=s.get("running", 0),
                                 waiting=s.get("waiting", 0), warmup_s=w.info.get("ready_s", 0.0),
                                 num_devices=1, expert_imbalance=s.get("expert_imbalance", 0.0),
                                 ep_rank=s.get("ep_rank", 0), ep_size=s.get("ep_size", 0),
                                 expert_load=[pb.ExpertLoad(tokens=row) for row in s.get("expert_load", [])])
        if r.controller is not None:
            r.controller.fill_status(out)
        return out

    async def ApplyConfig(self, request, context):  # noqa: N802
        """Hand a new cluster config to the controller, which reconciles the pools to it."""
        if self.r.controller is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this router has no controller (fixed pools)")
        res = await self.r.controller.apply(request.config_yaml, request.cluster_token, request.dry_run)
        if "error" in res:
            await context.abort(grpc.StatusCode[res["code"]], res["error"])
        return pb.ApplyConfigResponse(changes=res["changes"], message=res["message"])


async def serve(router: Router, host: str, port: int, *, max_message_bytes: int = 4 << 20, api_token: str = "",
                tls_cert: str | None = None, tls_key: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the public server (MiniInfer + health + reflection). Returns it and its port.

    Larger messages than max_message_bytes fail with RESOURCE_EXHAUSTED; with api_token every
    MiniInfer call needs `authorization: Bearer <token>`; with tls_cert/tls_key it serves TLS."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes)],
                             interceptors=[TokenAuth(api_token)] if api_token else None)
    add_service(MiniInferService(router), server)
    router.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(router.health, server)
    names = (pb.DESCRIPTOR.services_by_name["MiniInfer"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls_cert and tls_key:
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls_cert, tls_key))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the router to {host}:{port}")
    await router.start()
    await router._update_health()
    await server.start()
    return server, bound


__all__ = ["Router", "RouterConfig", "serve", "READY"]
