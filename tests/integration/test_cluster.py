"""The disaggregated cluster on CPU: outputs equal the local engine and HF; pools end full."""

from __future__ import annotations

import concurrent.futures as cf

import grpc
import pytest

from cluster.background import BackgroundCluster as RunningCluster
from cluster.client import build_request
from engine.llm import EngineConfig, LLMEngine
from engine.sampling import SamplingParams
from tests.helpers import hf_greedy
from tests.integration.conftest import make_config

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
    "Water boils at a temperature of",
    "The quick brown fox",
    "In 1492, Columbus",
    "import numpy as np\n",
]
N = 24

# Exact identity with HF and the local engine under any batching needs fp32 KV: with int8 KV
# a one-ulp difference from a different batch composition can flip an int8 rounding, and
# from there a near-tie. The int8 default config is checked separately below.
TWO = {"replicas": 2}
TOPOLOGIES = [
    pytest.param(dict(transport="gloo", kv_dtype="fp32"), id="1p1d-gloo"),
    pytest.param(dict(transport="grpc", kv_dtype="fp32"), id="1p1d-grpc"),
    pytest.param(dict(transport="gloo", kv_dtype="fp32", prefill=TWO, decode=TWO), id="2p2d-gloo"),
    pytest.param(dict(transport="grpc", kv_dtype="fp32", prefill=TWO, decode=TWO), id="2p2d-grpc"),
    # the baseline disaggregation is measured against: one worker prefills and decodes its own prompts
    pytest.param(dict(mode="colocated", kv_dtype="fp32", prefill={"replicas": 0}), id="colocated"),
    # speculative decoding on the decode worker (n-gram drafts, 4 per step): lossless when greedy
    pytest.param(dict(transport="gloo", kv_dtype="fp32", decode={"speculative": {"drafter": "ngram", "k": 4}}),
                 id="1p1d-spec-ngram"),
    # decode steps launched one ahead (opt-in; "auto" turns it on for GPUs): tokens, cancels, deadlines
    pytest.param(dict(transport="gloo", kv_dtype="fp32", decode={"run_ahead": "on"}), id="1p1d-run-ahead"),
]


@pytest.fixture(scope="module")
def local_outputs(smollm2):
    """Greedy tokens of the local engine for each KV dtype, prompts one at a time."""
    out = {}
    for kv in ("fp32", "int8"):
        eng = LLMEngine(smollm2, EngineConfig(kv_dtype=kv, num_pages=256))
        ids = [smollm2.tokenizer.encode(p) for p in PROMPTS]
        out[kv] = [eng.generate([i], SamplingParams(max_tokens=N))[0] for i in ids]
    return out


def stream(stub, prompt, timeout=120, **kw):
    req = build_request(prompt, max_tokens=kw.pop("max_tokens", N), temperature=kw.pop("temperature", 0.0), **kw)
    ids, text, last = [], "", None
    for msg in stub.Generate(req, timeout=timeout):
        ids.extend(msg.token_ids)
        text += msg.text
        last = msg
    return ids, text, last


@pytest.fixture(scope="module", params=TOPOLOGIES)
def cluster(request, ray_session):
    c = RunningCluster(make_config(**request.param))
    c.kv = request.param["kv_dtype"]
    yield c
    c.close()


def test_32_concurrent_streams_match_local_engine(cluster, local_outputs):
    ref = local_outputs[cluster.kv]
    with cf.ThreadPoolExecutor(32) as pool:
        futs = [pool.submit(stream, cluster.stub, PROMPTS[i % len(PROMPTS)]) for i in range(32)]
        results = [f.result(timeout=300) for f in futs]
    for i, (ids, text, last) in enumerate(results):
        want = ref[i % len(PROMPTS)]
        assert ids == want.token_ids, f"prompt {i % len(PROMPTS)} differs"
        assert text == want.text
        assert last.usage.completion_tokens == len(want.token_ids)
    st = cluster.wait_pools_full()
    assert {p.name: len(p.workers) for p in st.pools} == {
        "prefill": len(cluster.cluster.table.pool("prefill")),
        "decode": len(cluster.cluster.table.pool("decode")),
    }


def test_decode_workers_speculate_only_when_configured(cluster):
    import ray

    stream(cluster.stub, "one two three four one two three four one two three four one two", max_tokens=16)
    stats = [ray.get(w.handle.status.remote(), timeout=30) for w in cluster.cluster.table.pool("decode")]
    spec = cluster.cluster.config.decode.speculative
    drafted = sum(s.get("spec_drafted_tokens", 0) for s in stats)
    if spec is None:
        assert drafted == 0 and not any("spec_drafted_tokens" in s for s in stats)
    else:  # requests ran through draft + verify steps, and some drafts were kept
        assert drafted > 0 and sum(s["spec_accepted_tokens"] for s in stats) > 0, stats


def test_decode_steps_run_ahead_as_configured(cluster):
    import ray

    stream(cluster.stub, "The capital of France is", max_tokens=12)
    stats = [ray.get(w.handle.status.remote(), timeout=30) for w in cluster.cluster.table.pool("decode")]
    ahead = sum(s["ahead_steps"] for s in stats)
    cfg = cluster.cluster.config  # auto (the default) runs ahead on CUDA only
    on = cfg.decode.run_ahead == "on" or (cfg.decode.run_ahead == "auto" and cfg.device == "cuda")
    assert ahead > 0 if on else ahead == 0, stats


def test_greedy_matches_hf(cluster, hf_smollm2, smollm2):
    hf, _ = hf_smollm2
    for p in PROMPTS[:3]:
        ref = hf_greedy(hf, smollm2.tokenizer.encode(p), N)
        got, _, _ = stream(cluster.stub, p)
        assert got == ref


def test_int8_default_cluster(ray_session, local_outputs):
    """The default config (int8 KV, gloo): one request at a time it is token-identical to the
    local int8 engine (int8 pages and scales cross the P/D boundary bit-exact); under 32
    concurrent clients batching-order rounding may flip late near-ties, so agreement is bounded."""
    c = RunningCluster(make_config(transport="gloo", kv_dtype="int8"))
    try:
        _check_int8_cluster(c, local_outputs["int8"])
    finally:
        c.close()


def _check_int8_cluster(c, ref):
    for i, p in enumerate(PROMPTS):
        got, text, _ = stream(c.stub, p)
        assert got == ref[i].token_ids and text == ref[i].text
    with cf.ThreadPoolExecutor(32) as pool:
        futs = [pool.submit(stream, c.stub, PROMPTS[i % len(PROMPTS)]) for i in range(32)]
        results = [f.result(timeout=300) for f in futs]
    same = total = 0
    for i, (ids, _, _) in enumerate(results):
        want = ref[i % len(PROMPTS)].token_ids
        assert ids[:8] == want[:8] and len(ids) == len(want)
        same += sum(a == b for a, b in zip(ids, want))
        total += len(want)
    assert same / total >= 0.9, f"int8 agreement under concurrency {same / total:.3f}"
    c.wait_pools_full()


def test_cancel_mid_stream_frees_pages(cluster):
    req = build_request("Write a very long story about dragons.", max_tokens=400, temperature=0.0,
                        ignore_eos=True)
    call = cluster.stub.Generate(req, timeout=120)
    got = 0
    for msg in call:
        got += len(msg.token_ids)
        if got >= 5:
            call.cancel()
            break
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    cluster.wait_pools_full()


def test_expired_deadline_frees_pages(cluster):
    req = build_request("Tell me everything about the ocean.", max_tokens=500, temperature=0.0, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as e:
        for _ in cluster.stub.Generate(req, timeout=1.5):
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cluster.wait_pools_full()


BAD = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x " * 3000), "over the limit"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=-3), "max_tokens"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", temperature=float("nan")), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.01), "top_p"),
    (dict(prompt="hi", model="llama-70b"), "model"),
    (dict(token_ids=[10**6]), "token_ids"),
    (dict(messages=[]), "messages"),
]


def test_bad_requests_invalid_argument_and_server_keeps_serving(cluster, local_outputs):
    for bad, needle in BAD:
        kw = dict(bad)
        prompt = kw.pop("prompt", None)
        req = build_request(prompt, **kw)
        with pytest.raises(grpc.RpcError) as e:
            list(cluster.stub.Generate(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert needle in e.value.details(), (kw, e.value.details())
    ids, _, _ = stream(cluster.stub, PROMPTS[0])
    assert ids == local_outputs[cluster.kv][0].token_ids
    cluster.wait_pools_full()
