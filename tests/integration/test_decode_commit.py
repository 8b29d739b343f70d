"""The decode worker's commit of received KV: it releases the sender before the engine
thread imports the pages, and every path still ends with the pool full. One DecodeWorker
in this process, no Ray, no transfer: the received payload is handed to `_commit` directly."""

from __future__ import annotations

import asyncio

import pytest

import decode.worker as dw
from decode.worker import DecodeWorker
from engine.sampling import SamplingParams
from kvtransfer.layout import export_pages, make_header
from kvtransfer.worker_spec import WorkerSpec

PAGES = 64
PROMPT = list(range(100, 140))  # 40 tokens: 3 pages


@pytest.fixture
def worker():
    """A fresh worker per test (an EngineLoop thread starts once)."""
    return DecodeWorker("dcommit", WorkerSpec(num_pages=PAGES, transport="gloo", torch_threads=1, kv_dtype="int8"))


def _run(w: DecodeWorker, body):
    async def main():
        await w.start()
        try:
            return await asyncio.wait_for(body(), 60)
        finally:
            await w.stop()
    return asyncio.run(main())


async def _free(w: DecodeWorker) -> int:
    return await asyncio.wrap_future(w.loop.submit(lambda: w.engine.pool.num_free))


async def _polled(w: DecodeWorker, leg: str, pred, timeout: float = 20.0) -> list[dict]:
    """Poll until an item of `leg` satisfies pred; -> every item of leg seen."""
    seen: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        seen += [i for i in await w.poll(0.2) if i["request_id"] == leg]
        if any(pred(i) for i in seen):
            return seen
    raise AssertionError(f"no matching item for {leg}: {seen}")


async def _receive(w: DecodeWorker, leg: str, max_tokens: int):
    """Reserve pages for leg and hand _commit a payload as a transfer would."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    from dataclasses import asdict

    ticket = await w.reserve(leg, PROMPT, asdict(params), 30.0)
    assert "error" not in ticket, ticket
    payload = await asyncio.wrap_future(w.loop.submit(export_pages, w.engine.cache, list(range(3)), len(PROMPT)))
    header = make_header(w.engine.cache, payload, leg, ticket["ticket_id"], len(PROMPT), first_token=7)
    await w._commit(header, payload)


def test_commit_runs_on_the_engine_thread_and_the_request_decodes_to_the_end(worker):
    async def body():
        await _receive(worker, "leg-ok", max_tokens=6)
        items = await _polled(worker, "leg-ok", lambda i: i["finished"])
        assert items[0].get("committed") is True  # the router hears of the commit first
        tokens = [t for i in items for t in i["token_ids"]]
        assert len(tokens) == 5 and items[-1]["finish_reason"] == "length"  # 1 from prefill + 5
        return await _free(worker)

    assert _run(worker, body) == PAGES


def test_a_failed_import_frees_the_pages_and_names_the_worker(worker, monkeypatch):
    def broken(*a, **k):
        raise MemoryError("no room for the pages")

    monkeypatch.setattr(dw, "import_pages", broken)

    async def body():
        await _receive(worker, "leg-bad", max_tokens=6)  # returns: the sender is not told
        items = await _polled(worker, "leg-bad", lambda i: i["finished"])
        err = items[-1]
        assert err["finish_reason"] == "error" and "no room for the pages" in err["error"]
        assert err["worker"] == "dcommit"  # the router excludes this worker on the retry
        assert not any(i.get("committed") for i in items)
        return await _free(worker), worker.transfers_failed

    free, failed = _run(worker, body)
    assert free == PAGES and failed >= 1


def test_an_abort_right_after_the_commit_finishes_the_request(worker):
    async def body():
        await _receive(worker, "leg-abort", max_tokens=400)
        # no await between: the abort is queued behind the commit on the engine thread
        assert await worker.abort("leg-abort") is True
        await asyncio.sleep(0.3)
        return await _free(worker), await asyncio.wrap_future(
            worker.loop.submit(lambda: len(worker.engine.scheduler.running)))

    assert _run(worker, body) == (PAGES, 0)


def test_an_abort_that_overtakes_its_reserve_refuses_the_late_reserve(worker):
    """The router gave up on a reserve still queued on the worker and aborted it: the abort
    ran first. The late reserve must not hold pages until the transfer timeout."""
    from dataclasses import asdict

    async def body():
        assert await worker.abort("late~1") is False
        params = asdict(SamplingParams(max_tokens=4, temperature=0.0))
        refused = await worker.reserve("late~1", PROMPT, params, 30.0)
        assert refused.get("code") == "CANCELLED" and "aborted" in refused["error"]
        again = await worker.reserve("late~2", PROMPT, params, 30.0)  # other legs are untouched
        assert "ticket_id" in again
        assert await worker.abort("late~2") is True  # cancels the pending ticket
        return await _free(worker), len(worker.pending)

    assert _run(worker, body) == (PAGES, 0)


def test_an_abort_that_lands_while_its_reserve_waits_for_pages_refuses_it(worker):
    """The reserve is already running (waiting for the engine thread to allocate) when its
    abort arrives: the reserve must not register a ticket nobody will use."""
    from dataclasses import asdict

    async def body():
        params = asdict(SamplingParams(max_tokens=4, temperature=0.0))
        reserve = asyncio.ensure_future(worker.reserve("race~1", PROMPT, params, 30.0))
        await asyncio.sleep(0)  # the reserve runs up to its wait for the allocation
        assert await worker.abort("race~1") is False
        refused = await reserve
        assert refused.get("code") == "CANCELLED", refused
        return await _free(worker), len(worker.pending), len(worker.early_aborts)

    assert _run(worker, body) == (PAGES, 0, 0)


def test_a_prefill_call_overtaken_by_its_abort_does_not_run():
    from dataclasses import asdict

    from prefill.worker import PrefillWorker

    p = PrefillWorker("ptest", WorkerSpec(num_pages=PAGES, transport="gloo", torch_threads=1, kv_dtype="int8"))

    async def main():
        await p.start()
        try:
            assert await p.abort("gone~1") is False
            res = await p.prefill("gone~1", PROMPT, asdict(SamplingParams(max_tokens=4)), {}, None)
            steps = await asyncio.wrap_future(p.loop.submit(lambda: p.loop.steps))
            return res, steps, p.prefilled
        finally:
            await p.stop()

    res, steps, prefilled = asyncio.run(main())
    assert res.get("code") == "CANCELLED" and "aborted" in res["error"]
    assert steps == 0 and prefilled == 0  # no prefill step ran for nobody
