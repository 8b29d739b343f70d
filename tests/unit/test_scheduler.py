"""The scheduler with no model: a fake runner returns fixed tokens."""

from engine.page_pool import PagePool
from engine.request import FinishReason, Request, StepOutput
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler


def run(sched: Scheduler, token: int = 5, max_steps: int = 500):
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        steps.append(batch)
        n = sum(s.sample for s in batch.seqs)
        sched.update(batch, StepOutput([token] * n))
    return steps


def test_runs_to_max_tokens_and_frees_pages():
    pool = PagePool(16)
    s = Scheduler(pool, eos_token_ids=(2,))
    reqs = [Request(list(range(1, 20 + i)), SamplingParams(max_tokens=10)) for i in range(3)]
    for r in reqs:
        s.add(r)
    run(s)
    assert all(r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 10 for r in reqs)
    assert pool.is_full()


def test_eos_and_stop_token_ids_and_ignore_eos():
    s = Scheduler(PagePool(8), eos_token_ids=(5,))
    a = Request([1, 2, 3], SamplingParams(max_tokens=10))
    b = Request([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    c = Request([1, 2, 3], SamplingParams(max_tokens=9, stop_token_ids=(5,), ignore_eos=True))
    for r in (a, b, c):
        s.add(r)
    run(s, token=5)
    assert (a.finish_reason, len(a.output_token_ids)) == (FinishReason.STOP, 1)
    assert (b.finish_reason, len(b.output_token_ids)) == (FinishReason.LENGTH, 4)
    assert c.finish_reason is FinishReason.STOP


def test_chunked_prefill_respects_token_budget():
    s = Scheduler(PagePool(32), max_num_batched_tokens=10)
    r = Request(list(range(35)), SamplingParams(max_tokens=2))
    s.add(r)
    steps = run(s)
    assert [b.num_tokens for b in steps[:4]] == [10, 10, 10, 5]
    assert [sq.sample for b in steps[:4] for sq in b.seqs] == [False, False, False, True]
    assert len(r.output_token_ids) == 2


def test_decode_rows_come_first_and_batch_is_continuous():
    s = Scheduler(PagePool(32), max_num_batched_tokens=64)
    a = Request(list(range(10)), SamplingParams(max_tokens=5))
    s.add(a)
    first = s.schedule()
    s.update(first, StepOutput([7]))
    b = Request(list(range(8)), SamplingParams(max_tokens=5))
    s.add(b)
    second = s.schedule()
    assert [(sq.request is a, sq.num_new_tokens) for sq in second.seqs] == [(True, 1), (False, 8)]


def test_preemption_when_pages_run_out_then_recompute():
    pool = PagePool(4)  # 64 tokens
    s = Scheduler(pool, max_num_batched_tokens=256)
    a = Request(list(range(30)), SamplingParams(max_tokens=20, ignore_eos=True))
    b = Request(list(range(30)), SamplingParams(max_tokens=20, ignore_eos=True))
    s.add(a)
    s.add(b)
    steps = run(s)
    assert len(a.output_token_ids) == 20 and len(b.output_token_ids) == 20
    # b was pushed out at some point and recomputed as one prefill over prompt + outputs
    assert any(sq.request is b and sq.num_new_tokens > 30 for st in steps for sq in st.seqs)
    assert pool.is_full()


def test_abort_frees_pages_and_drops_in_flight_token():
    pool = PagePool(8)
    s = Scheduler(pool)
    r = Request(list(range(20)), SamplingParams(max_tokens=50))
    s.add(r)
    batch = s.schedule()
    assert pool.num_used == 2
    s.abort(r.request_id)
    assert pool.is_full() and r.finish_reason is FinishReason.ABORT
    assert s.update(batch, StepOutput([9])) == []
    assert r.output_token_ids == [] and not s.has_unfinished()


def test_waiting_request_that_never_fits_is_not_admitted():
    pool = PagePool(2)
    s = Scheduler(pool)
    s.add(Request(list(range(100)), SamplingParams(max_tokens=1)))
    assert s.schedule().is_empty and pool.is_full()
