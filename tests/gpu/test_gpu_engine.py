"""The GPU engine (Triton kernels + CUDA-graph decode) against the CPU reference engine.

All on one seeded dummy model of the SmolLM2-135M shape (bench/shapes.py). The CPU
reference is computed inside the test, on the same machine's CPU.

Tolerances (documented in docs/PERF.md):
- graph replay vs eager, fp32: same kernels, padded batch and a fixed split-K width, so
  only summation order differs -> |diff| <= 1e-3 + 1e-3 * |eager|.
- bf16 GPU vs fp32 CPU: ||logits_bf16 - logits_fp32|| / ||logits_fp32|| <= 0.05. The bf16
  rounding of the weights alone gives 0.021 on this model (measured with the torch path
  on CPU, bf16 vs fp32), so 0.05 leaves room for kernel differences, not for bugs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.shapes import smollm2_135m
from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, dummy_model
from engine.request import Request, ScheduledBatch, ScheduledSeq
from engine.sampling import SamplingParams
from tests.helpers import spy_gemvs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = ModelConfig.from_hf(smollm2_135m())
BF16_REL_TOL = 0.05
GREEDY_STEPS = 32


@pytest.fixture(scope="module")
def cpu_model():
    return dummy_model(CFG, seed=0, dtype=torch.float32, device="cpu")


def _engine(model, device, **config) -> LLMEngine:
    """A CPU engine gets its own copy of model: it swaps the linear layers for transposed
    CPULinear ones in place, which _on_gpu's copies must not inherit."""
    config.setdefault("num_pages", 512)
    if device == "cpu":
        model = copy.deepcopy(model)
    return LLMEngine(
        LoadedModel(model, None, CFG, "smollm2-shape", 0.0), EngineConfig(**config), device
    )


def _on_gpu(cpu_model, dtype=torch.float32):
    return copy.deepcopy(cpu_model).to(device="cuda", dtype=dtype)


def _prompts(lengths=(5, 17, 33), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _greedy(engine: LLMEngine, prompts) -> list[list[int]]:
    params = SamplingParams(max_tokens=GREEDY_STEPS, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)]


def _decode_batch(engine: LLMEngine, ctx_lens: list[int], seed: int) -> ScheduledBatch:
    """Requests already holding ctx - 1 tokens of (random) KV, each fed its last token."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in ctx_lens:
        req = Request(
            torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist(), SamplingParams()
        )
        req.pages = engine.pool.allocate(-(-n // 16))
        req.num_computed_tokens = n - 1
        seqs.append(ScheduledSeq(req, 1, True))
    return ScheduledBatch(seqs)


def _release(engine: LLMEngine, batch: ScheduledBatch) -> None:
    for s in batch.seqs:
        engine.pool.free(s.request.pages)


def _page_sums(engine: LLMEngine) -> torch.Tensor:
    return engine.cache.data.float().sum(dim=(0, 1, 3, 4, 5))  # [P]


def test_graph_replay_matches_eager_for_every_bucket(cpu_model):
    engine = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=64, num_pages=4096)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert engine.warmup_seconds > 0
    engine.cache.data.normal_()  # random K/V for every page
    lens = torch.Generator().manual_seed(0)
    for prev, bs in zip([0, *graphs.buckets], graphs.buckets):
        for n in sorted({bs, prev + 1}, reverse=True):  # full bucket, then the most padded
            ctx = torch.randint(1, 600, (n,), generator=lens).tolist()
            batch = _decode_batch(engine, ctx, seed=bs * 1000 + n)
            step = engine.runner.collect(batch)
            written = {slot // 16 for slot in step.slots}
            before = _page_sums(engine)
            with torch.inference_mode():
                replayed = engine.runner.sampled_logits(step, use_graphs=True).clone()
                changed = (_page_sums(engine) != before).nonzero().flatten().tolist()
                eager = engine.runner.sampled_logits(step, use_graphs=False)
            assert graphs.bucket_for(n) == bs
            assert set(changed) <= written, f"bucket {bs}: padding rows wrote pages {changed}"
            torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-3)
            _release(engine, batch)


def _prefill_batch(engine: LLMEngine, lens: list[tuple[int, int]], seed: int) -> ScheduledBatch:
    """(prefix, new) per sequence: `prefix` tokens already in the cache (random K/V), `new`
    fed now; every sequence samples."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for prefix, new in lens:
        req = Request(torch.randint(3, CFG.vocab_size, (prefix + new,), generator=g).tolist(),
                      SamplingParams())
        req.pages = engine.pool.allocate(-(-(prefix + new) // 16))
        req.num_computed_tokens = prefix
        seqs.append(ScheduledSeq(req, new, True))
    return ScheduledBatch(seqs)


def test_prefill_graph_replay_matches_eager_for_every_bucket(cpu_model):
    engine = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=64, num_pages=4096)
    graphs = engine.runner.prefill_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 64, 128, 192, 256, 384, 512]
    assert graphs.max_seqs == 8
    engine.cache.data.normal_()
    for prev, t in zip([0, *graphs.buckets], graphs.buckets):
        for n in sorted({t, max(2, prev + 1)}, reverse=True):  # full bucket, then the most padded
            # a chunk after a prefix, a new prompt and a decode row (one chunk when n is tiny)
            a = n // 2
            lens = [(37, a), (0, n - a - 1), (300, 1)] if n - a > 1 else [(37, n)]
            batch = _prefill_batch(engine, lens, seed=t * 1000 + n)
            step = engine.runner.collect(batch)
            assert len(step.input_ids) == n and graphs.bucket_for(n) == t
            written = {slot // 16 for slot in step.slots}
            before = _page_sums(engine)
            replays = graphs.replays
            with torch.inference_mode():
                replayed = engine.runner.sampled_logits(step, use_graphs=True).clone()
                changed = (_page_sums(engine) != before).nonzero().flatten().tolist()
                eager = engine.runner.sampled_logits(step, use_graphs=False)
            assert graphs.replays == replays + 1, f"{n} tokens did not replay bucket {t}"
            assert set(changed) <= written, f"bucket {t}: padding wrote pages {changed}"
            torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-3)
            _release(engine, batch)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_fp32_greedy_tokens_match_cpu_engine(cpu_model, cuda_graphs):
    prompts = _prompts()
    want = _greedy(_engine(cpu_model, "cpu"), prompts)
    gpu = _engine(_on_gpu(cpu_model), "cuda", cuda_graphs=cuda_graphs, prefill_graphs=cuda_graphs,
                  max_num_seqs=8, decode_run_ahead="auto")
    assert (gpu.runner.graphs is not None) == cuda_graphs
    assert (gpu.runner.prefill_graphs is not None) == cuda_graphs
    assert _greedy(gpu, prompts) == want
    assert gpu.ahead_steps >= GREEDY_STEPS - 4  # "auto": decode run-ahead on CUDA
    if cuda_graphs:  # the prompts' prefill step replayed a prefill graph
        assert gpu.runner.prefill_graphs.replays >= 1
    step_by_step = _engine(_on_gpu(cpu_model), "cuda", cuda_graphs=cuda_graphs, prefill_graphs=cuda_graphs,
                           max_num_seqs=8, decode_run_ahead="off")
    assert _greedy(step_by_step, prompts) == want and step_by_step.ahead_steps == 0


def test_run_ahead_past_a_stop_then_a_new_request(cpu_model):
    """A step runs ahead of a request that then stops on a token: its tokens end at the stop,
    and the next request, whose pages may be the stopped one's while that step is still
    queued, gets the CPU engine's tokens; the pool ends full."""
    prompt, second = _prompts((21,), seed=6), _prompts((40,), seed=7)
    cpu = _engine(cpu_model, "cpu")
    plain, want2 = _greedy(cpu, prompt)[0], _greedy(cpu, second)
    stop = next(t for i, t in enumerate(plain) if i >= 3 and t not in plain[:i])
    gpu = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=8, decode_run_ahead="on")
    params = SamplingParams(max_tokens=GREEDY_STEPS, ignore_eos=True, stop_token_ids=(stop,))
    assert gpu.generate(prompt, params)[0].token_ids == plain[: plain.index(stop) + 1]
    assert gpu._ahead is not None  # launched past the stop, not yet drained
    assert _greedy(gpu, second) == want2 and gpu.pool.is_full()


def test_run_ahead_sampling_matches_step_by_step(cpu_model):
    """Seeded sampling with logprobs, graph-replayed logits sampled on the device: the steps
    launched ahead give the tokens and logprobs of stepping one at a time."""
    prompts = _prompts((6, 30), seed=8)
    params = SamplingParams(max_tokens=GREEDY_STEPS, ignore_eos=True, temperature=0.8, top_k=20, seed=3,
                            logprobs=True)
    runs = []
    for ahead in ("on", "off"):
        gpu = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=8, decode_run_ahead=ahead)
        runs.append([(c.token_ids, c.logprobs) for c in gpu.generate(prompts, [params, params])])
        assert (gpu.ahead_steps > 0) == (ahead == "on") and gpu.pool.is_full()
    (on, off) = runs
    assert [t for t, _ in on] == [t for t, _ in off]
    for (_, a), (_, b) in zip(on, off):
        assert len(a) == GREEDY_STEPS and a == pytest.approx(b, abs=1e-5)


def test_chunked_prefill_through_graphs_matches_cpu(cpu_model):
    """A 100-token prompt in 32-token chunks: three that sample nothing, then the last one."""
    prompts = _prompts((100, 7), seed=4)
    want = _greedy(_engine(cpu_model, "cpu"), prompts)
    gpu = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=8, max_num_batched_tokens=32)
    assert gpu.runner.prefill_graphs.buckets == [16, 32]
    assert _greedy(gpu, prompts) == want
    assert gpu.runner.prefill_graphs.replays >= 4


def _prefill_then_decode_logits(engine: LLMEngine, prompt: list[int], token: int) -> torch.Tensor:
    """Logits [len(prompt) + 1, V] float32 on CPU: a prefill, then one decode step of `token`.

    The decoded token is fixed, not the argmax: bf16 may pick another token than fp32, and
    the two decode rows would then see different contexts."""
    req = Request(list(prompt), SamplingParams())
    req.pages = engine.pool.allocate(-(-(len(prompt) + 1) // 16))
    with torch.inference_mode():
        pre = engine.runner.logits(ScheduledBatch([ScheduledSeq(req, len(prompt), True)]))
        req.num_computed_tokens = len(prompt)
        req.output_token_ids.append(token)
        step = engine.runner.collect(ScheduledBatch([ScheduledSeq(req, 1, True)]))
        dec = engine.runner.sampled_logits(step)  # a graph replay on CUDA
    return torch.cat([pre.float().cpu(), dec.float().cpu()])


def test_bf16_logits_within_tolerance_of_cpu_fp32(cpu_model):
    prompt = _prompts((33,), seed=2)[0]
    ref = _prefill_then_decode_logits(_engine(cpu_model, "cpu"), prompt, 42)
    bf16 = _engine(_on_gpu(cpu_model, torch.bfloat16), "cuda", max_num_seqs=8)
    got = _prefill_then_decode_logits(bf16, prompt, 42)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"bf16 GPU vs fp32 CPU logits: relative L2 error {rel:.4f}")
    assert rel <= BF16_REL_TOL
    # the decode row (last) went through the captured graph: check it on its own too
    assert ((got[-1] - ref[-1]).norm() / ref[-1].norm()).item() <= BF16_REL_TOL


def test_int8_kv_runs_on_gpu_and_matches_cpu_int8(cpu_model):
    prompts = _prompts((9, 40), seed=3)
    want = _greedy(_engine(cpu_model, "cpu", kv_dtype="int8"), prompts)
    gpu = _engine(_on_gpu(cpu_model), "cuda", kv_dtype="int8", max_num_seqs=8)
    assert gpu.cache.quantized and gpu.runner.graphs is not None
    got = _greedy(gpu, prompts)
    assert all(len(t) == GREEDY_STEPS for t in got)
    assert got == want


def test_pdl_launches_give_the_ordinary_launches_results(cpu_model):
    """Programmatic dependent launch (EngineConfig.pdl) changes when kernels start, never
    what they compute: with PDL on and off, bf16 + int8 KV, the graph-replayed prefill and
    decode steps give the same tokens and logits, bit for bit."""
    import kernels._triton as kt

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs compute capability 9.0+")
    prompts = _prompts((5, 40, 130), seed=3)
    runs = {}
    for pdl in (True, False):
        with kt.pdl_scope(pdl):
            assert kt.pdl_args(torch.empty(1, device="cuda")).get("launch_pdl", False) == pdl
        engine = _engine(_on_gpu(cpu_model, torch.bfloat16), "cuda", max_num_seqs=8,
                         kv_dtype="int8", pdl="on" if pdl else "off")
        assert engine.backend.pdl is pdl
        tokens = _greedy(engine, prompts)
        logits = _prefill_then_decode_logits(engine, prompts[1], 42)
        assert engine.runner.graph_steps() > 0
        runs[pdl] = tokens, logits
    assert runs[True][0] == runs[False][0]
    assert torch.equal(runs[True][1], runs[False][1])


def test_fused_decode_store_gives_the_two_launches_results(cpu_model, monkeypatch):
    """FUSE_ROTARY_STORE (rotary + K/V store inside the decode-attention kernel): fp32
    greedy tokens equal the CPU engine's through graphs and run-ahead, and bf16 + bf16 KV
    logits of a graph-replayed decode step equal the two-launch engine's."""
    import kernels.decode_attention as da
    import kernels.ops

    calls = []
    fused_op = kernels.ops.rotary_store_decode_attention

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return fused_op(*args, **kwargs)

    prompts = _prompts()
    want = _greedy(_engine(cpu_model, "cpu"), prompts)
    monkeypatch.setattr(kernels.ops, "rotary_store_decode_attention", counted)
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    gpu = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=8, decode_run_ahead="on")
    assert calls, "the decode graphs did not take the fused launch"
    assert _greedy(gpu, prompts) == want
    logits = {}
    for fuse in (True, False):
        monkeypatch.setattr(da, "FUSE_ROTARY_STORE", fuse)
        engine = _engine(_on_gpu(cpu_model, torch.bfloat16), "cuda", max_num_seqs=8)
        logits[fuse] = _prefill_then_decode_logits(engine, prompts[2], 42)
    print(f"fused vs two launches, bf16 logits: max |diff| "
          f"{(logits[True] - logits[False]).abs().max().item():.3g}")
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("norms", ["row", "split", "split_after"])
def test_gemv_kernel_engine_matches_cpu_and_cublas(cpu_model, norms, monkeypatch):
    """EngineConfig.gemv: the decode graphs send every few-row linear layer through
    kernels/gemv.py (gate_up with SiLU fused), with the residual adds + norms inside the
    GEMVs: "row", in the GEMV after each (SmolLM2's width), or "split" between the GEMVs
    around each (gemv_add, gemv_rmsnorm_sums: rows as wide as the 8B shape's, forced here
    with NORM_MAX_K = 0; "split_after" with SPLIT_SCALE_AFTER); fp32 greedy tokens equal
    the CPU engine's, and bf16 logits stay within the bf16 tolerance of the cuBLAS engine's."""
    import engine.layers
    import kernels.gemv as g

    calls = []
    if norms == "split_after":
        monkeypatch.setattr(g, "SPLIT_SCALE_AFTER", True)
        norms = "split"
    if norms == "split":
        monkeypatch.setattr(g, "NORM_MAX_K", 0)
        monkeypatch.setattr(g, "SPLIT_NORM", True)
    prompts = _prompts()
    want = _greedy(_engine(cpu_model, "cpu"), prompts)
    spy_gemvs(monkeypatch, calls)
    gpu = _engine(_on_gpu(cpu_model), "cuda", max_num_seqs=8, gemv="4")
    assert gpu.backend.gemv_rows > 0 and gpu.runner.graphs is not None
    assert isinstance(gpu.runner.model.layers[0].mlp.gate_up, engine.layers.Linear)
    fused = ("gemv_add_rmsnorm",) if norms == "row" else ("gemv_add", "gemv_rmsnorm_sums")
    for rows, gated in ((1, True), (4, False)):
        assert {name for r, gt, name in calls if (r, gt) == (rows, gated)} & {"gemv", *fused}, \
            "the decode graphs did not take the GEMV"
    assert {name for *_, name in calls} == {"gemv", *fused}
    assert all(rows <= gpu.backend.gemv_rows for rows, *_ in calls)
    assert _greedy(gpu, prompts) == want
    logits = {}
    for setting in ("on", "off"):
        eng = _engine(_on_gpu(cpu_model, torch.bfloat16), "cuda", max_num_seqs=8, gemv=setting)
        logits[setting] = _prefill_then_decode_logits(eng, prompts[2], 42)
    rel = ((logits["on"] - logits["off"]).norm() / logits["off"].norm()).item()
    print(f"GEMV vs cuBLAS, bf16 logits: relative L2 difference {rel:.4f}")
    assert rel <= BF16_REL_TOL
