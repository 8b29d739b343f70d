"""Decode run-ahead (engine/llm.py): a greedy decode step launched before the step
before it has been read, fed that step's tokens on the device.

- The same greedy tokens and finish reasons as stepping one at a time, over requests
  that cross page boundaries, stop on a token, stop on length, join mid-run, and are
  aborted while a step runs ahead of them; steps really ran ahead; the pool ends full.
- A pool too short for the page the next step needs: no run-ahead there, same tokens.
- Sampled (seeded) and logprobs requests run ahead with the same tokens and logprobs;
  speculative decoding does not run ahead.
"""

from __future__ import annotations

import pytest
import torch

from bench.shapes import smollm2_135m
from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, dummy_model
from engine.sampling import SamplingParams

TINY = ModelConfig.from_hf(
    {**smollm2_135m(), "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 96}
)
MAX_STEPS = 400  # every loop below ends well before this


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster on a busy 2-core box
    yield LoadedModel(dummy_model(TINY, seed=3), None, TINY, "tiny", 0.0)
    torch.set_num_threads(threads)


def _engine(tiny, ahead: str, **kw) -> LLMEngine:
    return LLMEngine(tiny, EngineConfig(num_pages=kw.pop("num_pages", 32), decode_run_ahead=ahead, **kw))


def _drive(engine: LLMEngine, script: dict[int, list], aborts: dict | None = None) -> dict:
    """Step until done; before step i add script[i]'s (prompt, params) and abort aborts[i]'s
    requests (by their index in the order added). -> index -> (tokens, finish reason)."""
    ids, got, reasons, aborts = [], {}, {}, aborts or {}
    for i in range(MAX_STEPS):
        for prompt, params in script.get(i, []):
            ids.append(engine.add_request(prompt, params))
            got[ids[-1]] = []
        for k in aborts.get(i, []):
            assert engine.abort(ids[k])
            reasons[ids[k]] = "aborted"
        if not engine.has_unfinished() and i > max(script):
            break
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons.setdefault(out.request_id, out.finish_reason.value)
    else:
        raise AssertionError(f"not done after {MAX_STEPS} steps")
    return {k: (got[rid], reasons.get(rid)) for k, rid in enumerate(ids)}


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _late_token(tokens: list[int], after: int) -> int:
    """A token that first occurs at index `after` or later (a stop token met mid-way)."""
    return next(t for i, t in enumerate(tokens) if i >= after and t not in tokens[:i])


def test_run_ahead_gives_the_same_tokens(tiny):
    # prompts ending just before, on and after page boundaries (16 tokens a page)
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    script = {
        0: [(_prompt(14, 1), long), (_prompt(16, 2), SamplingParams(max_tokens=3, ignore_eos=True))],
        2: [(_prompt(31, 3), long)],
        9: [(_prompt(5, 4), SamplingParams(max_tokens=1, ignore_eos=True)), (_prompt(17, 5), long)],
    }
    plain = _drive(_engine(tiny, "off"), script)
    # a stop token the first request meets mid-way, for a copy of it added at step 20
    stop = _late_token(plain[0][0], 4)
    first = plain[0][0].index(stop)
    script[20] = [(_prompt(14, 1), SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop,)))]
    plain = _drive(_engine(tiny, "off"), script)
    engine = _engine(tiny, "on")
    ahead = _drive(engine, script)
    assert ahead == plain
    assert ahead[5] == (plain[0][0][: first + 1], "stop")
    assert [len(ahead[k][0]) for k in range(5)] == [30, 3, 30, 1, 30]
    assert engine.ahead_steps > 20  # 29 of the 40 steps ran ahead when written
    assert engine.pool.is_full() and not engine.scheduler.running


def test_abort_while_a_step_runs_ahead(tiny):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    script = {0: [(_prompt(15, 6), params), (_prompt(20, 7), params), (_prompt(9, 8), params)]}
    plain = _drive(_engine(tiny, "off"), script)
    engine = _engine(tiny, "on")
    for prompt, p in script[0]:
        engine.add_request(prompt, p)
    for _ in range(4):  # a prefill, then decode steps running ahead
        engine.step()
    assert engine._ahead is not None
    rid = engine.scheduler.running[1].request_id
    assert engine.abort(rid)
    outs = {o.request_id for _ in range(3) for o in engine.step()}
    assert rid not in outs
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.is_full()
    # the others' tokens, abort or not, equal the plain run's (checked step by step below)
    ahead = _drive(_engine(tiny, "on"), script, aborts={5: [1]})
    assert ahead[0] == plain[0] and ahead[2] == plain[2]
    assert ahead[1][1] == "aborted" and ahead[1][0] == plain[1][0][: len(ahead[1][0])]


def test_everyone_stopping_leaves_the_ahead_step_behind(tiny):
    """A step ran ahead of requests that all stopped (here on a stop token): the next
    step drops it and serves the requests that came after."""
    plain = _drive(_engine(tiny, "off"), {0: [(_prompt(12, 9), SamplingParams(max_tokens=12, ignore_eos=True))]})
    stop = _late_token(plain[0][0], 3)
    params = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop,))
    engine = _engine(tiny, "on")
    first = _drive(engine, {0: [(_prompt(12, 9), params)]})
    assert first[0][1] == "stop" and engine._ahead is not None  # launched past the stop
    rid = engine.add_request(_prompt(12, 9), SamplingParams(max_tokens=12, ignore_eos=True))
    outs = engine.step()
    assert [o.request_id for o in outs] == [rid]  # its prefill, not the stale step
    later = list(outs[0].new_token_ids)
    while engine.has_unfinished() and len(later) < 20:
        later.extend(t for o in engine.step() for t in o.new_token_ids)
    assert later == plain[0][0] and engine.pool.is_full()


def test_short_pool_stops_running_ahead_not_decoding(tiny):
    """Two pages for a 15-token prompt + 17 tokens: the step that would need a third page
    is not launched ahead (the next step is scheduled and waits); tokens are the same."""
    params = SamplingParams(max_tokens=17, ignore_eos=True)
    script = {0: [(_prompt(15, 10), params)]}
    plain = _drive(_engine(tiny, "off", num_pages=2), script)
    engine = _engine(tiny, "on", num_pages=2)
    assert _drive(engine, script) == plain and len(plain[0][0]) == 17
    assert engine.ahead_steps > 0 and engine.pool.is_full()


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, top_k=8, seed=1),
    SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True),
    SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.1, seed=2, logprobs=True),
], ids=["seeded", "logprobs", "seeded-logprobs"])
def test_sampled_and_logprobs_requests_run_ahead(tiny, params):
    """Seeded sampling draws from each request's generator once a step in either mode, so
    the tokens are the same; logprobs come back with the tokens of the step launched ahead."""
    prompts = [_prompt(10, 11), _prompt(23, 18)]

    def run(ahead):
        engine = _engine(tiny, ahead)
        out = engine.generate(prompts, [params, params])
        assert engine.pool.is_full()
        return [(c.token_ids, c.logprobs) for c in out], engine.ahead_steps

    (plain, none), (got, steps) = run("off"), run("on")
    assert none == 0 and steps > 5
    assert [t for t, _ in got] == [t for t, _ in plain]
    for (_, a), (_, b) in zip(got, plain):
        assert (a is None) == (b is None) == (not params.logprobs)
        if a is not None:
            assert len(a) == 12 and a == pytest.approx(b, abs=1e-5)


def test_speculative_decoding_does_not_run_ahead(tiny):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    spec = {"spec_drafter": "ngram", "spec_k": 2}
    plain = _drive(_engine(tiny, "off", **spec), {0: [(_prompt(10, 11), params)]})
    engine = _engine(tiny, "on", **spec)
    assert _drive(engine, {0: [(_prompt(10, 11), params)]}) == plain
    assert engine.ahead_steps == 0 and engine.pool.is_full()


def test_run_ahead_setting():
    with pytest.raises(ValueError, match="decode_run_ahead"):
        EngineConfig(decode_run_ahead="yes")


def test_a_request_joining_a_chain_is_served_at_once(tiny):
    """A request added while steps run ahead gets its prefill by the second step after
    (the step already launched is applied first), and the chain then carries it too."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    engine = _engine(tiny, "on")
    engine.add_request(_prompt(11, 12), params)
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None
    rid = engine.add_request(_prompt(7, 13), params)
    seen = [o.request_id for _ in range(2) for o in engine.step()]
    assert rid in seen
    before = engine.ahead_steps
    for _ in range(4):
        engine.step()
    assert engine.ahead_steps == before + 4 and len(engine._ahead.batch.seqs) == 2
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.is_full()


def test_no_step_runs_ahead_of_requests_that_all_end_by_length(tiny):
    engine = _engine(tiny, "on")
    got = _drive(engine, {0: [(_prompt(9, 14), SamplingParams(max_tokens=6, ignore_eos=True)),
                              (_prompt(3, 15), SamplingParams(max_tokens=4, ignore_eos=True))]})
    assert [len(t) for t, _ in got.values()] == [6, 4]
    assert engine._ahead is None and engine.ahead_steps > 0


def test_run_ahead_up_to_the_context_limit(tiny):
    """Requests that stop at the model's 96-token context, one of them crossing into its
    last page on the way."""
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    script = {0: [(_prompt(80, 16), params), (_prompt(62, 17), params)]}
    plain = _drive(_engine(tiny, "off"), script)
    engine = _engine(tiny, "on")
    ahead = _drive(engine, script)
    assert ahead == plain and [len(t) for t, _ in ahead.values()] == [16, 34]
    assert {r for _, r in ahead.values()} == {"length"} and engine.pool.is_full()
