"""The router never leaves a leg running behind a request that has gone.

No Ray and no model: fake prefill/decode handles (async methods behind `.remote()`) in the
worker table, the real Router and Generate handler over them. The fake decode worker emits
one token per poll for every leg it runs until it is told to abort that leg.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.client import build_request
from engine.loader.registry import load_tokenizer
from protos.miniinfer.v1 import miniinfer_pb2 as pb
from router.server import MiniInferService, Router, RouterConfig
from router.validate import Limits
from router.workers import READY, WorkerRef, WorkerTable


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


class _Handle:
    """Ray-handle look-alike: every public coroutine method is reachable as handle.name.remote()."""

    def __init__(self, impl) -> None:
        for name in dir(impl):
            if not name.startswith("_") and asyncio.iscoroutinefunction(getattr(impl, name)):
                setattr(self, name, _Method(getattr(impl, name)))


class FakeDecode:
    def __init__(self) -> None:
        self.running: dict[str, float] = {}  # leg -> tokens it has left to emit
        self.budget: dict[str, float] = {}  # reserved leg -> its max_tokens
        self.aborted: list[str] = []
        self.obey = True  # False: a worker whose aborts are lost (the leg keeps stepping)
        self.reserve_gate: asyncio.Event | None = None  # set: reserve calls wait for it

    async def status(self) -> dict:
        return {"pages_free": 100, "pages_total": 100, "running": len(self.running), "alive": True}

    async def reserve(self, leg, ids, params, timeout_s) -> dict:
        if self.reserve_gate is not None:
            await self.reserve_gate.wait()
        if leg in self.aborted:  # as the real worker does when an abort overtook the call
            return {"code": "CANCELLED", "error": f"{leg} was aborted before its pages were reserved"}
        self.budget[leg] = params["max_tokens"]
        return {"ticket_id": f"t-{leg}", "request_id": leg}

    async def poll(self, max_wait_s: float) -> list[dict]:
        await asyncio.sleep(0.01)
        out = []
        for leg in sorted(self.running):
            self.running[leg] -= 1
            done = self.running[leg] <= 0
            out.append({"request_id": leg, "token_ids": [7], "logprobs": None, "finished": done,
                        "finish_reason": "length" if done else None})
            if done:
                del self.running[leg]
        return out

    async def abort(self, leg: str) -> bool:
        self.aborted.append(leg)
        return self.obey and self.running.pop(leg, None) is not None


class FakePrefill:
    def __init__(self, decode: FakeDecode) -> None:
        self.decode = decode
        self.aborted: list[str] = []
        self.calls = 0

    async def status(self) -> dict:
        return {"alive": True}

    async def prefill(self, leg, ids, params, ticket, decode_handle) -> dict:
        self.calls += 1
        # the KV "landed": the decode worker runs the leg from now on (the first token was ours)
        self.decode.running[leg] = self.decode.budget.pop(leg) - 1
        return {"token": 5, "logprob": None, "finish_reason": None}

    async def abort(self, leg: str) -> bool:
        self.aborted.append(leg)
        return False


class FakeContext:
    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code, details):
        raise AssertionError(f"unexpected abort {code}: {details}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")[0]


async def _router(tokenizer) -> tuple[Router, FakeDecode, FakePrefill]:
    dec = FakeDecode()
    pre = FakePrefill(dec)
    table = WorkerTable()
    table.add(WorkerRef("d0", "decode", _Handle(dec), state=READY))
    table.add(WorkerRef("p0", "prefill", _Handle(pre), state=READY))
    cfg = RouterConfig(model="m", kv_dtype="fp32", transport="gloo", poll_wait_s=0.05, status_interval_s=60)
    router = Router(cfg, tokenizer, Limits(max_model_len=2048, vocab_size=tokenizer.vocab_size), table)
    await router.start()
    return router, dec, pre


async def _until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _request(rid: str, max_tokens: int):
    return build_request(token_ids=[1, 2, 3], max_tokens=max_tokens, temperature=0.0, request_id=rid)


def test_stream_closed_at_a_yield_aborts_both_legs(tokenizer):
    """grpc.aio ends a handler whose client went away (cancel, deadline) while a message was
    being written by closing the generator at its `yield`: no exception reaches the handler's
    except clauses. The decode leg must still be told at once, not left to run to max_tokens."""
    async def main():
        router, dec, pre = await _router(tokenizer)
        try:
            gen = MiniInferService(router).Generate(_request("r1", 400), FakeContext())
            got = [await gen.__anext__() for _ in range(3)]
            assert [m.token_ids[0] for m in got] == [5, 7, 7]
            (leg,) = dec.running
            assert leg.startswith("r1~")  # workers know the attempt by a router-unique id
            await gen.aclose()
            assert await _until(lambda: not dec.running), "decode leg still running after the stream closed"
            assert leg in dec.aborted and leg in pre.aborted
            assert router.active == {} and router.legs == {}
            await asyncio.sleep(0.2)  # outputs already on their way when it was aborted ...
            assert router.orphans_reaped == 0  # ... are not orphans: the handler did the abort
        finally:
            await router.stop()
    asyncio.run(main())


def test_a_reused_request_id_never_gets_the_old_legs_tokens(tokenizer):
    """A client retries with the same request id while the first attempt's leg is still
    stepping (its abort lost): the new stream carries exactly its own tokens."""
    async def main():
        router, dec, _ = await _router(tokenizer)
        try:
            dec.obey = False
            gen = MiniInferService(router).Generate(_request("same", 400), FakeContext())
            await gen.__anext__()
            await gen.aclose()  # the old leg goes on emitting a token every poll
            msgs = [m async for m in MiniInferService(router).Generate(_request("same", 4), FakeContext())]
            assert [t for m in msgs for t in m.token_ids] == [5, 7, 7, 7]
            assert msgs[-1].finish_reason and len(dec.running) == 1  # only the old leg is left
        finally:
            await router.stop()
    asyncio.run(main())


def test_a_leg_no_request_owns_is_reaped_at_most_once_a_second(tokenizer):
    """The backstop: a decode worker stepping a leg the router does not know (its abort was
    lost in a race) is told to drop it from the next poll, and again only a second later
    if it goes on, however often it is polled meanwhile."""
    async def main():
        router, dec, _ = await _router(tokenizer)
        try:
            dec.obey = False
            dec.running["ghost"] = float("inf")
            assert await _until(lambda: dec.aborted == ["ghost"]), "orphan leg never aborted"
            await asyncio.sleep(0.5)  # ~50 polls, all inside the second after that abort
            assert dec.aborted == ["ghost"] and router.orphans_reaped == 1
            assert await _until(lambda: len(dec.aborted) >= 2, timeout=5.0), "not aborted again"
            assert set(dec.aborted) == {"ghost"}
            # once it obeys, it is gone; a request the router owns is never touched by the reaper
            dec.obey = True
            assert await _until(lambda: not dec.running)
            reaped = router.orphans_reaped
            msgs = [m async for m in MiniInferService(router).Generate(_request("r2", 4), FakeContext())]
            assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].finish_reason
            assert router.orphans_reaped == reaped and all(a == "ghost" for a in dec.aborted)
        finally:
            await router.stop()
    asyncio.run(main())


def test_fault_filters_name_the_client_id_and_see_through_the_attempt_tag():
    from kvtransfer.faults import Fault

    first = Fault("prefill_running", "fail", request="r")
    assert first.matches("prefill_running", "p0", "r~5")
    assert not first.matches("prefill_running", "p0", "r~5#retry1")  # only the first attempt
    assert not first.matches("prefill_running", "p0", "rr~5")
    retry = Fault("prefill_running", "fail", request="r#retry1")
    assert retry.matches("prefill_running", "p0", "r~5#retry1")
    assert not retry.matches("prefill_running", "p0", "r~5")


def test_early_abort_notes_are_taken_once_and_stay_bounded():
    from kvtransfer.ticket import RecentLegs

    clock = [100.0]
    e = RecentLegs(ttl_s=10.0, limit=3, clock=lambda: clock[0])
    e.note("a~1")
    assert e.take("a~1") and not e.take("a~1")  # refused once, then forgotten
    e.note("b~1")
    clock[0] += 11.0
    assert not e.take("b~1")  # too old: the call it was waiting for never came
    for i in range(10):
        e.note(f"c~{i}")
    assert len(e) == 3 and e.take("c~9") and not e.take("c~0")  # the oldest made room


def test_an_abort_rpc_that_overtakes_the_reserve_ends_the_stream_as_aborted(tokenizer):
    """Abort arrives while the decode worker's reserve is still queued; the worker then
    refuses the late reserve. The client gets a finished `abort` message, not an error,
    and no prefill runs."""
    async def main():
        router, dec, pre = await _router(tokenizer)
        try:
            dec.reserve_gate = asyncio.Event()
            svc = MiniInferService(router)
            gen = svc.Generate(_request("ab", 10), FakeContext())
            first = asyncio.ensure_future(gen.__anext__())
            assert await _until(lambda: "ab" in router.active and router.active["ab"].decode_id)
            assert (await svc.Abort(pb.AbortRequest(request_id="ab"), FakeContext())).found
            dec.reserve_gate.set()
            msg = await asyncio.wait_for(first, 10)
            assert msg.finish_reason == pb.FINISH_REASON_ABORT and list(msg.token_ids) == []
            with pytest.raises(StopAsyncIteration):  # the stream ends there
                await gen.__anext__()
            assert pre.calls == 0 and router.active == {} and router.legs == {}
        finally:
            await router.stop()
    asyncio.run(main())


def test_within_a_passed_deadline_closes_the_unstarted_wait():
    """A deadline already past raises at once; the wait it was handed (a queue.get()
    coroutine) is closed, not left for Python to warn that it was never awaited."""
    queue: asyncio.Queue = asyncio.Queue()

    async def run():
        wait = queue.get()
        with pytest.raises(asyncio.TimeoutError, match="decode"):
            await Router._within(wait, time.monotonic() - 1.0, "decode")
        return wait

    wait = asyncio.run(run())
    assert wait.cr_frame is None  # closed: a coroutine never run and never closed keeps its frame
