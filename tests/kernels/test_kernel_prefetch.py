"""L2 prefetch (kernels/prefetch.py) and the decode-step weight prefetcher (decode/prefetch.py).

A prefetch has no visible result, so the "loads" mode sums what it read: on CPU (Triton's
interpreter) and GPU the sums must equal the words of the asked-for prefix, which fails if
a word is skipped, read twice or read past the prefix. The "bulk" mode (Hopper only) is
checked on a GPU: its PTX holds the instruction, it changes nothing, a replayed decode
graph launches it, and engines with it give the greedy tokens of engines without it.
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
    with pytest.raises(ValueError, match=r"out must be a contiguous int32 tensor of \[programs\]"):
        l2_prefetch(t, mode="loads", out=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match=r"\[programs\] = \[16\]"):
        l2_prefetch(t, mode="loads", out=torch.zeros(4, dtype=torch.int32, device=device))
    if not bulk_supported(torch.device(device)):
        with pytest.raises(ValueError, match="compute capability 9.0"):
            l2_prefetch(t, mode="bulk")


def test_settings_parse_and_auto_follows_the_environment(monkeypatch):
    assert parse_setting("off") is None
    assert parse_setting("bulk:32") == ("bulk", 32 * MIB)
    assert parse_setting("loads:0.5") == ("loads", MIB // 2)
    assert parse_setting("bulk:all")[0] == "bulk"
    for bad in ("on", "bulk", "bulk:", "bulk:-1", "bulk:x", "dma:8", "bulk:inf", "loads:nan"):
        with pytest.raises(ValueError, match="weight prefetch must be"):
            parse_setting(bad)
    with pytest.raises(ValueError, match="weight prefetch must be"):
        EngineConfig(weight_prefetch="fast")
    model = dummy_model(TINY, seed=3)
    monkeypatch.setenv("MINIINFER_WEIGHT_PREFETCH", "loads:2")
    assert resolve("auto", model) == ("loads", 2 * MIB)
    assert resolve("off", model) is None and resolve("bulk:3", model) == ("bulk", 3 * MIB)
    monkeypatch.setenv("MINIINFER_WEIGHT_PREFETCH", "auto")  # the rule below
    assert resolve("auto", model) is None
    monkeypatch.setenv("MINIINFER_WEIGHT_PREFETCH", "sometimes")
    with pytest.raises(ValueError, match="MINIINFER_WEIGHT_PREFETCH: weight prefetch must be"):
        resolve("auto", model)
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
    cap = parse_setting("loads:0.001")[1]  # 1048 bytes: asked for in whole 16-byte units
    pf = WeightPrefetcher(model, cap, mode="loads", programs=3)
    head = weight_bytes(model.lm_head)
    assert pf.nbytes(head) == 1040
    with pf.active():
        logits = engine.runner.logits(batch)
    assert pf.issued == len(pf.order)
    assert _sum(pf._sums) == loads_reference(head, 1040)
    assert torch.equal(logits, plain)
    engine.runner.logits(batch)
    assert pf.issued == len(pf.order)  # the hooks are gone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bulk_prefetch_runs_and_changes_nothing():
    import kernels.prefetch as kp

    if not bulk_supported(torch.device("cuda")):
        pytest.skip("the bulk prefetch needs compute capability 9.0+")
    t = torch.randn(3 * MIB + 40, device="cuda")
    compiled = kp._bulk_prefetch_kernel[(1,)](t.data_ptr(), 4096, 128, LANES=32, num_warps=1)
    assert "cp.async.bulk.prefetch.L2.global" in compiled.asm["ptx"]
    before = t.clone()
    for nbytes in (None, 16, 4 * MIB + 4, 0):
        assert l2_prefetch(t, nbytes, mode="bulk", programs=5) is None
    torch.cuda.synchronize()
    assert torch.equal(t, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setting", ["auto", "bulk:4", "bulk:all", "loads:1"])
def test_decode_graphs_with_prefetch_give_the_same_tokens(setting, monkeypatch):
    """A captured step prefetching weights (EngineConfig.weight_prefetch) against one not:
    the same greedy tokens. auto prefetches on Hopper for this shape (layers of <= 3.4 MiB)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.shapes import smollm2_135m
    from engine.config import ModelConfig

    monkeypatch.delenv("MINIINFER_WEIGHT_PREFETCH", raising=False)
    bulk = bulk_supported(torch.device("cuda"))
    auto_on = bulk and torch.cuda.get_device_capability()[0] == 9  # resolve's rule
    if setting.startswith("bulk") and not bulk:
        pytest.skip("the bulk prefetch needs compute capability 9.0+")
    cfg = ModelConfig.from_hf(smollm2_135m())
    model = dummy_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    runs = {}
    for s in ("off", setting):
        # each engine's warm-up captures its own graphs over the one model
        engine = LLMEngine(LoadedModel(model, None, cfg, "smollm2-shape", 0.0),
                           EngineConfig(num_pages=512, max_num_seqs=8, weight_prefetch=s), "cuda")
        assert (engine.runner.graphs.prefetch is None) == (s == "off" or (s == "auto" and not auto_on))
        out = engine.generate([[5, 6, 7, 8], list(range(3, 40))],
                              SamplingParams(max_tokens=24, ignore_eos=True))
        assert engine.runner.graph_steps() > 0
        runs[s] = [c.token_ids for c in out]
        if engine.runner.graphs.prefetch is not None:  # a replay launches the prefetch kernel
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.runner.graphs.graphs[1].replay()
                torch.cuda.synchronize()
            names = {e.name for e in prof.events()}
            kernel = "_bulk_prefetch_kernel" if s.startswith(("bulk", "auto")) else "_loads_prefetch_kernel"
            assert any(kernel in n for n in names), sorted(names)[:20]
    assert runs["off"] == runs[setting]


def test_ahead_plan_asks_for_the_first_bytes_only_where_it_can_help(monkeypatch):
    """kernels.prefetch.ahead / ahead_plan: nothing unless AHEAD_BYTES is set, a tensor is
    ahead (and only inside the block), the launch has PDL, and the bulk instruction exists;
    then the tensor's first AHEAD_BYTES (at most all of it, whole 16-byte units) split into
    one 16-byte-multiple chunk a lane."""
    import kernels.prefetch as kp

    cpu = torch.device("cpu")
    pdl, no_pdl = {"PDL": True, "launch_pdl": True}, {"PDL": False}
    w = torch.empty(4096, 4096, dtype=torch.bfloat16)  # the 8B shape's o weight, 32 MiB
    with kp.ahead(w):
        assert kp.ahead_plan(cpu, pdl, 1024) == (0, 0, 0)  # off by default
    monkeypatch.setattr(kp, "AHEAD_BYTES", 8 * MIB)
    with kp.ahead(w):
        assert kp.ahead_plan(cpu, pdl, 1024) == (0, 0, 0)  # the interpreter: no bulk instruction
    monkeypatch.setattr(kp, "bulk_supported", lambda device: True)
    assert kp.ahead_plan(cpu, pdl, 1024) == (0, 0, 0)  # nothing ahead
    with kp.ahead(w):
        assert kp.ahead_plan(cpu, pdl, 1024) == (w.data_ptr(), 8 * MIB, 8192)  # 32 heads x 32 lanes
        assert kp.ahead_plan(cpu, pdl, 3000) == (w.data_ptr(), 8 * MIB, 2800)  # chunks up to 16s
        assert kp.ahead_plan(cpu, no_pdl, 1024) == (0, 0, 0)
        with kp.ahead(None):
            assert kp.ahead_plan(cpu, pdl, 1024) == (0, 0, 0)
        assert kp.ahead_plan(cpu, pdl, 1024)[1] == 8 * MIB  # the outer block's again
    small = torch.empty(1000, dtype=torch.uint8)
    with kp.ahead(small):
        assert kp.ahead_plan(cpu, pdl, 32) == (small.data_ptr(), 992, 32)  # all of it, cut to 16s
    with kp.ahead(w.t()):
        assert kp.ahead_plan(cpu, pdl, 1024) == (0, 0, 0)  # not contiguous
    unaligned = torch.empty(4097, dtype=torch.bfloat16)[1:]
    with kp.ahead(unaligned):
        assert kp.ahead_plan(cpu, pdl, 1024) == (0, 0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_attention_with_ahead_gives_the_same_bits(monkeypatch):
    """Decode attention (the 8B shape's heads, int8 KV, batch 1 and 4) captured with PDL
    inside kernels.prefetch.ahead(a 32 MiB weight), AHEAD_BYTES 8 MiB: the reduce kernel
    takes the prefetch, and the output is the same bits as without."""
    import kernels.prefetch as kp
    from kernels._triton import pdl_scope
    from kernels.decode_attention import decode_attention

    if not bulk_supported(torch.device("cuda")):
        pytest.skip("the bulk prefetch needs compute capability 9.0+")
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages, page_size, hkv, d = 64, 16, 8, 128
    data = torch.randint(-127, 128, (2, pages, page_size, hkv, d), dtype=torch.int8, device="cuda",
                         generator=gen)
    scales = torch.rand(2, pages, page_size, hkv, device="cuda", generator=gen) / 64
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda", generator=gen)
    monkeypatch.setattr(kp, "AHEAD_BYTES", 8 * MIB)
    for b in (1, 4):
        q = torch.randn(b, 32, d, dtype=torch.bfloat16, device="cuda", generator=gen)
        tables = torch.arange(pages, dtype=torch.int32, device="cuda").view(4, -1)[:b]
        ctx = torch.tensor([200, 256, 17, 131][:b], dtype=torch.int32, device="cuda")
        outs = {}
        for on in (False, True):
            with pdl_scope(True), kp.ahead(w if on else None):
                assert (kp.ahead_plan(q.device, {"PDL": True}, 32)[1] > 0) == on
                decode_attention(q, data, scales, tables, ctx, partition_size=64)  # compile
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = decode_attention(q, data, scales, tables, ctx, partition_size=64)
            graph.replay()
            outs[on] = out.clone()
        assert torch.equal(outs[True], outs[False]), b
