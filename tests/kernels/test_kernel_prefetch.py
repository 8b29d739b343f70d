"""L2 prefetch (kernels/prefetch.py) and the decode-step weight prefetcher (decode/prefetch.py).

A prefetch has no visible result, so the "loads" mode sums what it read: on CPU (Triton's
interpreter) and GPU the sums must equal the words of the asked-for prefix, which fails if
a word is skipped, read twice or read past the prefix. The "bulk" mode (Hopper only) is
checked on a GPU: it runs, changes nothing, and captured decode steps with it give the
logits of steps without it, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from decode.prefetch import (
    MIB,
    WeightPrefetcher,
    gemv_order,
    parse_setting,
    resolve,
    weight_bytes,
)
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, dummy_model
from engine.request import Request, ScheduledBatch, ScheduledSeq
from engine.sampling import SamplingParams
from kernels.prefetch import bulk_supported, l2_prefetch, loads_reference, wrap_int32
from tests.unit.test_run_ahead import TINY


def _sum(out: torch.Tensor) -> int:
    return wrap_int32(int(out.cpu().to(torch.int64).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("numel, nbytes, programs", [
    (4096, None, 1), (4096, None, 3), (5000, 1204, 4), (3 * 1024 + 8, None, 16), (64, 0, 2),
])
def test_loads_read_every_word_of_the_prefix_once(device, dtype, numel, nbytes, programs):
    if dtype == torch.int8:
        t = torch.randint(-128, 128, (numel,), dtype=torch.int8, device=device)
    else:
        t = torch.randn(numel, device=device).to(dtype)
    before = t.clone()
    out = l2_prefetch(t, nbytes, mode="loads", programs=programs)
    assert out.shape == (programs,) and out.dtype == torch.int32
    assert _sum(out) == loads_reference(t, nbytes)
    assert torch.equal(t, before)


def test_loads_sum_changes_with_one_word(device):
    """The check above can fail: one flipped word past the first program's block shows."""
    t = torch.randint(-1000, 1000, (8192,), dtype=torch.int32, device=device)
    ref = _sum(l2_prefetch(t, mode="loads", programs=2))
    t[5000] += 1
    assert _sum(l2_prefetch(t, mode="loads", programs=2)) == wrap_int32(ref + 1)


def test_bad_arguments_are_refused(device):
    t = torch.zeros(256, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="mode must be one of"):
        l2_prefetch(t, mode="dma")
    with pytest.raises(ValueError, match=r"nbytes must be in \[0, 512\]"):
        l2_prefetch(t, 513, mode="loads")
    with pytest.raises(ValueError, match="multiple of 4"):
        l2_prefetch(t, 6, mode="loads")
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch(t.view(16, 16).t(), mode="loads")
    with pytest.raises(ValueError, match="programs must be >= 1"):
        l2_prefetch(t, mode="loads", programs=0)
    with pytest.raises(ValueError, match="out must be a contiguous 1-D int32"):
        l2_prefetch(t, mode="loads", out=torch.zeros(4, device=device))
    if not bulk_supported(torch.device(device)):
        with pytest.raises(ValueError, match="compute capability 9.0"):
            l2_prefetch(t, mode="bulk")


def test_settings_parse_and_auto_follows_the_environment(monkeypatch):
    assert parse_setting("off") is None
    assert parse_setting("bulk:32") == ("bulk", 32 * MIB)
    assert parse_setting("loads:0.5") == ("loads", MIB // 2)
    assert parse_setting("bulk:all")[0] == "bulk"
    for bad in ("on", "bulk", "bulk:", "bulk:-1", "bulk:x", "dma:8"):
        with pytest.raises(ValueError, match="weight prefetch must be"):
            parse_setting(bad)
    with pytest.raises(ValueError, match="weight prefetch must be"):
        EngineConfig(weight_prefetch="fast")
    model = dummy_model(TINY, seed=3)
    monkeypatch.setenv("MINIINFER_WEIGHT_PREFETCH", "loads:2")
    assert resolve("auto", model) == ("loads", 2 * MIB)
    assert resolve("off", model) is None and resolve("bulk:3", model) == ("bulk", 3 * MIB)
    monkeypatch.delenv("MINIINFER_WEIGHT_PREFETCH")
    assert resolve("auto", model) is None  # on CPU: the bulk prefetch is GPU-only


def test_gemv_order_is_the_step_order():
    model = dummy_model(TINY, seed=3)
    order = gemv_order(model)
    want = []
    for layer in model.layers:
        want += [layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down]
    assert order == want + [model.lm_head]


def _prefill(engine: LLMEngine, n: int) -> ScheduledBatch:
    req = Request(list(range(3, 3 + n)), SamplingParams())
    req.pages = engine.pool.allocate(-(-n // 16))
    return ScheduledBatch([ScheduledSeq(req, n, True)])


def test_prefetcher_follows_the_forward_and_leaves_its_logits_alone(device):
    """Inside active(): one prefetch on entry, one after every linear layer but the LM head,
    the last of the LM head's first cap bytes; outside, none. Logits do not change."""
    model = dummy_model(TINY, seed=3).to(device)
    engine = LLMEngine(LoadedModel(model, None, TINY, "tiny", 0.0),
                       EngineConfig(num_pages=8, attention_backend="triton", cuda_graphs=False,
                                    prefill_graphs=False, weight_prefetch="off"), device)
    batch = _prefill(engine, 5)
    plain = engine.runner.logits(batch)
    cap = 1000
    pf = WeightPrefetcher(model, cap, mode="loads", programs=3)
    with pf.active():
        logits = engine.runner.logits(batch)
    assert pf.issued == len(pf.order)
    assert _sum(pf._sums) == loads_reference(weight_bytes(model.lm_head), cap)
    assert torch.equal(logits, plain)
    engine.runner.logits(batch)
    assert pf.issued == len(pf.order)  # the hooks are gone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bulk_prefetch_runs_and_changes_nothing():
    if not bulk_supported(torch.device("cuda")):
        pytest.skip("the bulk prefetch needs compute capability 9.0+")
    t = torch.randn(3 * MIB + 40, device="cuda")
    before = t.clone()
    for nbytes in (None, 16, 4 * MIB + 4, 0):
        assert l2_prefetch(t, nbytes, mode="bulk", programs=5) is None
    torch.cuda.synchronize()
    assert torch.equal(t, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setting", ["auto", "bulk:4", "bulk:all", "loads:1"])
def test_decode_graphs_with_prefetch_give_the_same_tokens(setting):
    """A captured step prefetching weights (EngineConfig.weight_prefetch) against one not:
    the same greedy tokens. auto prefetches on Hopper for this shape (layers of <= 3.4 MiB)."""
    from bench.shapes import smollm2_135m
    from engine.config import ModelConfig

    bulk = bulk_supported(torch.device("cuda"))
    if setting.startswith("bulk") and not bulk:
        pytest.skip("the bulk prefetch needs compute capability 9.0+")
    cfg = ModelConfig.from_hf(smollm2_135m())
    model = dummy_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    runs = {}
    for s in ("off", setting):
        # each engine's warm-up captures its own graphs over the one model
        engine = LLMEngine(LoadedModel(model, None, cfg, "smollm2-shape", 0.0),
                           EngineConfig(num_pages=512, max_num_seqs=8, weight_prefetch=s), "cuda")
        assert (engine.runner.graphs.prefetch is None) == (s == "off" or (s == "auto" and not bulk))
        out = engine.generate([[5, 6, 7, 8], list(range(3, 40))],
                              SamplingParams(max_tokens=24, ignore_eos=True))
        assert engine.runner.graph_steps() > 0
        runs[s] = [c.token_ids for c in out]
        if engine.runner.graphs.prefetch is not None:
            assert engine.runner.graphs.prefetch.issued > 0
    assert runs["off"] == runs[setting]
