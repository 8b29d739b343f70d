"""Engine-level text behaviour on SmolLM2: incremental detokenization, stop strings, aborts."""

import pytest

from engine.errors import InvalidRequest
from engine.llm import EngineConfig, LLMEngine
from engine.sampling import SamplingParams
from engine.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def engine(smollm2):
    return LLMEngine(smollm2, EngineConfig(num_pages=256))


def test_incremental_detokenizer_equals_full_decode(smollm2):
    tok = smollm2.tokenizer
    text = "naïve café 日本語 🤖 code: def f(x):\n    return x"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [])
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) == text == d.text
    assert any(p == "" for p in pieces), "multi-byte characters must be held back until complete"


def test_text_equals_decode_of_tokens(engine):
    out = engine.generate([engine.tokenizer.encode("Once upon a time")], SamplingParams(max_tokens=30))[0]
    assert out.text == engine.tokenizer.decode(out.token_ids)


def test_stop_string_truncates_and_finishes(engine):
    tok = engine.tokenizer
    prompt = tok.encode("Count: 1, 2, 3, 4,")
    free = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    stop = free.text[5:8]
    assert stop.strip(), free.text
    out = engine.generate([prompt], SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert len(out.token_ids) < len(free.token_ids)
    assert engine.pool.is_full()


def test_stop_token_ids(engine):
    tok = engine.tokenizer
    prompt = tok.encode("The capital of France is")
    free = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(free.token_ids[2],)))[0]
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"


def test_abort_mid_generation_frees_pages(engine):
    rid = engine.add_request(engine.tokenizer.encode("Tell me a long story"), SamplingParams(max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0
    assert engine.abort(rid)
    assert engine.pool.is_full() and not engine.has_unfinished()
    assert not engine.abort(rid)


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], SamplingParams(), "empty"),
        ([1] * 9000, SamplingParams(), "context length"),
        ([70000], SamplingParams(), "token ids"),
        ([1, 2], SamplingParams(max_tokens=100000), "max_tokens"),
    ],
)
def test_bad_requests_rejected(engine, prompt, params, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


def test_seeded_sampling_reproducible(engine):
    p = engine.tokenizer.encode("My favourite food is")
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=42)
    a = engine.generate([p], params)[0]
    b = engine.generate([p, p[:3]], [params, SamplingParams(max_tokens=5, temperature=1.0)])[0]
    assert a.token_ids == b.token_ids


def test_textstream_holds_back_possible_stop_prefix(smollm2):
    from engine.textstream import TextStream

    tok = smollm2.tokenizer
    ids = tok.encode("one, two, three")
    s = TextStream(tok, [], stop=(", thr",))
    sent = "".join(s.push([t], False) for t in ids)
    assert s.stopped and sent == "one, two"


def test_warm_up_requests_leave_nothing_behind(engine):
    """The GPU warm-up's throw-away requests (run here on CPU, where warm-up skips them):
    they finish, free their pages, leave no stream, and the engine serves the same tokens."""
    prompt = engine.tokenizer.encode("The capital of France is")
    before = engine.generate([prompt], SamplingParams(max_tokens=4)).pop().token_ids
    engine._warm_requests()
    assert engine.pool.is_full() and not engine.has_unfinished() and not engine._streams
    assert engine.generate([prompt], SamplingParams(max_tokens=4)).pop().token_ids == before



def test_warm_up_requests_skipped_when_the_pool_is_too_small(engine, monkeypatch, caplog):
    """Two free pages cannot hold two requests at once: the warm-up says so and runs
    nothing (an engine with a tiny pool still starts)."""
    monkeypatch.setattr(type(engine.pool), "num_free", property(lambda self: 2))
    with caplog.at_level("WARNING", logger="engine.llm"):
        engine._warm_requests()
    assert "too few for the throw-away requests" in caplog.text
    assert not engine.has_unfinished() and engine.pool.num_used == 0
