"""GPU decode: MiniInfer (Triton kernels + CUDA graphs) vs HF transformers, SDPA and the floor.

One run on one GPU prints JSON lines (one per measurement), then a table. Weights are
seeded random (bench/shapes.py shapes, built directly on the GPU in bf16); the HF model
shares our weight tensors (views of our fused qkv / gate_up), so both run the same model.

What each row measures (ms per decode step = wall time of one whole step, host included):
- ours graph / ours eager: `ModelRunner.execute` of one decode step (inputs built on the
  host, model, logits, greedy sampling, tokens back on the host); graph = CUDA-graph
  replay, eager = the same kernels launched one by one.
- ours engine loop, run-ahead on / off: the median wall time of `LLMEngine.step()` while
  one greedy request decodes (prompt of ctx - 1 tokens), what a client sees per token.
  With run-ahead the next step is launched before this one's tokens are read, so the
  host's work overlaps the GPU's (engine/llm.py); off, every step waits for its tokens.
- linears GEMV / cuBLAS (batch 1): the same engine's decode graphs captured again with
  `EngineConfig.gemv` flipped (kernels/gemv.py for the linear layers, or cuBLAS), replay
  and engine-loop times side by side (gemv_rows_ab).
- HF eager / HF static / HF static+compile: `generate` with the dynamic cache, with
  `cache_implementation="static"` and `disable_compile=True`, and with the static cache
  and HF's automatic `torch.compile` (mode reduce-overhead); the step time is the median
  gap between consecutive tokens handed to a streamer (each gap is one decode step).
- floor: bytes a step must read (every weight once, LM head included, the embedding row
  only, plus the KV of every sequence) / device copy bandwidth, measured here by timing a
  large `copy_` and counting bytes read + written.
- decode attention: `kernels.decode_attention` on one layer; bandwidth = KV (+ scales)
  bytes / time. prefill attention: causal FLOPs (2 * B * H * S^2 * D) / time, ours over a
  paged cache vs SDPA's flash and cuDNN backends on contiguous tensors, medians of 5
  interleaved rounds.

    python bench/gpu_decode.py [--no-cuda-graph] [--quick] [--profile-dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JsonLines, format_table, progress
from bench.shapes import llama3_8b, smollm2_135m
from engine.attention import decode_partition_size
from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, random_model
from engine.request import Request, ScheduledBatch, ScheduledSeq
from engine.sampling import SamplingParams

ROWS: list[list] = []  # the final table
OUT = JsonLines(os.environ.get("GPU_DECODE_JSON"))
T0 = time.perf_counter()


def emit(section: str, name: str, **fields) -> None:
    OUT.emit({"section": section, "name": name, **fields})


def row(what: str, value: float | None, unit: str, note: str = "") -> None:
    ROWS.append([what, value, unit, note])
    path = os.environ.get("GPU_DECODE_TABLE")
    if path:  # the table so far, in case the run is cut short
        with open(path, "w") as f:
            f.write(format_table(["measurement", "value", "unit", "note"], ROWS) + "\n")


def guarded(label: str, fn, *args, **kwargs):
    """Run one measurement; a failing baseline is reported, not fatal."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - report and go on
        progress(f"{label} failed: {exc!r}")
        traceback.print_exc(file=sys.stderr)
        emit("error", label, error=repr(exc)[:500])
        row(label, None, "", f"FAILED: {type(exc).__name__}")
        return None


def sync() -> None:
    torch.cuda.synchronize()


def median_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms; fn must end with a host sync (or we add one)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def event_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median device time of fn() in ms, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, calls: int = 16, iters: int = 20) -> float:
    """Median device ms of one fn() among `calls` back-to-back calls replayed from one CUDA
    graph: the kernels' time as the engine's graph-replayed step sees it. (event_ms around
    one eager call also counts the host's launch work while the GPU waits for it: ~0.1 ms
    for a Triton kernel's Python launch path, which hid half of decode attention's speed.)"""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    ms = event_ms(graph.replay, iters=iters)
    del graph
    return ms / calls


# ---- floor ----


def copy_bandwidth() -> float:
    """Bytes/s of a large device copy, counting bytes read plus bytes written."""
    n = 1 << 30  # 1 GiB each way
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src), iters=20)
    return 2 * n / (ms * 1e-3)


def step_bytes(cfg: ModelConfig, dtype_bytes: int, batch: int, ctx: int, kv_bytes: float) -> float:
    """Bytes one decode step must move: weights once + KV read for every sequence."""
    c = cfg
    per_layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    per_layer += 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    weights = c.num_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size
    embed_rows = batch * c.hidden_size  # only the looked-up rows of the embedding
    kv = batch * ctx * c.num_layers * 2 * c.num_kv_heads * kv_bytes
    return (weights + embed_rows) * dtype_bytes + kv


def kv_bytes_per_elem(kv_dtype: str, head_dim: int) -> float:
    """KV bytes per (token, layer, K-or-V, head) element row, scales included, per element."""
    return 1.0 + 4.0 / head_dim if kv_dtype == "int8" else 2.0


# ---- our engine ----


def build_engine(
    cfg: ModelConfig, model, args, kv_dtype="auto", num_pages=1024, max_seqs=8, graphs: bool = True,
    weight_prefetch: str = "auto", gemv: str = "auto",
) -> LLMEngine:
    config = EngineConfig(
        weight_prefetch=weight_prefetch,
        gemv=gemv,
        kv_dtype=kv_dtype,
        num_pages=num_pages,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=8192,
        cuda_graphs=graphs and not args.no_cuda_graph,
        prefill_graphs=graphs and not args.no_cuda_graph,
        max_graph_batch_size=max_seqs,
    )
    return LLMEngine(LoadedModel(model, None, cfg, "random", 0.0), config, "cuda")


def ab_engine(shape_name: str, batches, ctx: int, loop_steps: int, **config):
    """For side-by-side benches: a bf16 model of a bench.shapes shape (seeded random weights)
    and a graph engine over it whose pool fits max(batches) sequences of ctx + loop_steps
    tokens, its cache filled with random KV. config: build_engine's keywords.
    -> (ModelConfig, model, engine)."""
    from bench.shapes import shape

    cfg = ModelConfig.from_hf(shape(shape_name))
    model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    max_bs = max(batches)
    pages = max_bs * (ctx + loop_steps + 64) // 16 + 64
    engine = build_engine(cfg, model, argparse.Namespace(no_cuda_graph=False), num_pages=pages,
                          max_seqs=max_bs, **config)
    fill_cache_random(engine)
    return cfg, model, engine


def logits_of_each(engine: LLMEngine, sets: dict, sb: ScheduledBatch) -> dict[str, torch.Tensor]:
    """Run sb through each set of decode graphs (`decode.graphs.CudaGraphRunner`s over the
    engine's model and cache), which also fills its static inputs. -> label: logits [b, V]."""
    base, b = engine.runner.graphs, len(sb.seqs)
    out = {}
    try:
        for label, g in sets.items():
            engine.runner.graphs = g
            engine.runner.execute(sb)
            out[label] = g.logits[g.bucket_for(b)][:b].clone()
    finally:
        engine.runner.graphs = base
    return out


def replay_rounds(sets: dict, batch: int, rounds: int, iters: int) -> dict[str, list[float]]:
    """CUDA-event ms of each set's graph for `batch` (inputs as logits_of_each left them),
    the sets interleaved round by round. -> label: one median of iters replays a round."""
    times = {label: [] for label in sets}
    for _ in range(rounds):
        for label, g in sets.items():
            times[label].append(event_ms(g.graphs[g.bucket_for(batch)].replay, iters=iters))
    return times


def loop_rounds(engine: LLMEngine, sets: dict, ctx: int, steps: int, rounds: int = 3) -> dict[str, list[float]]:
    """loop_step_ms (run-ahead on) with each set as the engine's decode graphs, the sets
    interleaved round by round. -> label: one figure a round."""
    base = engine.runner.graphs
    times = {label: [] for label in sets}
    try:
        for _ in range(rounds):
            for label, g in sets.items():
                engine.runner.graphs = g
                times[label].append(loop_step_ms(engine, ctx, steps, True))
    finally:
        engine.runner.graphs = base
    return times


def mode(engine: LLMEngine) -> str:
    return "graph" if engine.runner.graphs is not None else "eager"


def fill_cache_random(engine: LLMEngine) -> None:
    """Never time attention over zeros: random K/V (and scales) in every page."""
    c = engine.cache
    if c.quantized:
        c.data.random_(-127, 128)
        c.scales.uniform_(0.005, 0.02)
    else:
        c.data.normal_()


def decode_batch(engine: LLMEngine, batch: int, ctx: int, seed: int = 0) -> ScheduledBatch:
    """`batch` requests already holding ctx - 1 tokens of KV, each fed its last token."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    seqs = []
    for _ in range(batch):
        req = Request(torch.randint(3, vocab, (ctx,), generator=g).tolist(), SamplingParams())
        req.pages = engine.pool.allocate(-(-ctx // 16))
        req.num_computed_tokens = ctx - 1
        seqs.append(ScheduledSeq(req, 1, True))
    return ScheduledBatch(seqs)


def release(engine: LLMEngine, batch: ScheduledBatch) -> None:
    for s in batch.seqs:
        engine.pool.free(s.request.pages)
        s.request.pages = []


def ours_step_ms(engine: LLMEngine, batch: int, ctx: int, iters: int, graphs: bool = True) -> float:
    sb = decode_batch(engine, batch, ctx)
    r = engine.runner
    saved = r.graphs, r.prefill_graphs
    if not graphs:  # eager: neither the decode nor the prefill graphs (which fit small batches)
        r.graphs = r.prefill_graphs = None
    try:
        return median_ms(lambda: r.execute(sb), iters)
    finally:
        r.graphs, r.prefill_graphs = saved
        release(engine, sb)


def loop_step_ms(engine: LLMEngine, ctx: int, steps: int, run_ahead: bool) -> float:
    """Median wall ms of `engine.step()` while one greedy request decodes `steps` tokens
    after a prompt of ctx - 1 tokens (its prefill and first two decode steps not counted):
    the per-token time a client sees, host work included, like HF's StepClock."""
    saved, engine.run_ahead = engine.run_ahead, run_ahead
    try:
        times = request_steps(engine, ctx - 1, steps + 4, seed=11)
    finally:
        engine.run_ahead = saved
    return statistics.median(times[3 : 3 + steps])


def request_steps(engine: LLMEngine, prompt_len: int, new_tokens: int, seed: int) -> list[float]:
    """Wall ms of every engine.step() of one request run alone (at most new_tokens + 8)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, engine.model_config.vocab_size, (prompt_len,), generator=g).tolist()
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    steps = []
    while engine.has_unfinished() and len(steps) < new_tokens + 8:
        t0 = time.perf_counter()
        engine.step()
        steps.append(1e3 * (time.perf_counter() - t0))
    if engine.has_unfinished():
        raise RuntimeError(f"a {new_tokens}-token request took more than {new_tokens + 8} steps")
    return steps


def first_request(engine: LLMEngine, prompt_len: int = 128, new_tokens: int = 48, agains: int = 5,
                  idle_s: float = 0.5) -> dict:
    """The first request after warm-up, step by step, against the same request (its length,
    other random prompts) run again `agains` times, and against prompts of other lengths
    (first and second time): a step slower only the first time is lazy initialization left
    on the hot path. Each of these requests starts after the same `idle_s` pause, so a GPU
    or host that slows when idle slows them all alike; a request's first decode step cannot
    overlap the host's work with the GPU's (its token comes from the prefill), so it is
    compared with the same step of the requests after, not with the steady steps."""
    time.sleep(idle_s)
    first = request_steps(engine, prompt_len, new_tokens, seed=7)
    again = []
    for i in range(agains):
        time.sleep(idle_s)
        again.append(request_steps(engine, prompt_len, new_tokens, seed=8 + i))
    out = {
        "prefill_ms": first[0],
        "first_decode_ms": first[1],
        "second_decode_ms": first[2],
        "steady_decode_ms": statistics.median(first[len(first) // 2 :]),
        "again_prefill_ms": statistics.median(a[0] for a in again),
        "again_prefill_max_ms": max(a[0] for a in again),
        "again_first_decode_ms": statistics.median(a[1] for a in again),
        "again_first_decode_max_ms": max(a[1] for a in again),
        "again_steady_decode_ms": statistics.median(statistics.median(a[len(a) // 2 :]) for a in again),
        "agains": agains,
    }
    for n in (77, 600):  # off the 16-token grid; a long prompt (prefill's big-tile launch)
        out[f"prefill_{n}_first_ms"] = request_steps(engine, n, 2, seed=n)[0]
        out[f"prefill_{n}_again_ms"] = request_steps(engine, n, 2, seed=n + 1)[0]
    return out


def profile_steps(engine: LLMEngine, out_dir: str, steps: int, batch: int = 8, ctx: int = 512,
                  name: str = "smollm2") -> str:
    """A torch profiler (chrome) trace of `steps` decode steps, with NVTX step/layer ranges;
    also prints the kernels that took the most GPU time (per step)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    sb = decode_batch(engine, batch, ctx, seed=3)
    engine.runner.execute(sb)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.runner.execute(sb)
        sync()
    path = os.path.join(out_dir, f"decode_trace_{name}_b{batch}.json")
    prof.export_chrome_trace(path)
    print_top_kernels(prof, steps, f"{name} b{batch} ctx{ctx}", top=14)
    release(engine, sb)
    return path


def print_top_kernels(prof, steps: int, label: str, top: int = 12) -> None:
    """The GPU kernels of a finished torch profile of `steps` steps, by time per step."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels) / steps
    count = sum(e.count for e in kernels) / steps
    print(f"# {label}: GPU kernel time {total / 1e3:.4f} ms/step, {count:.0f} launches, top kernels:")
    for e in kernels[:top]:
        print(f"#   {e.device_time_total / steps / 1e3:8.4f} ms {e.count / steps:5.0f}x "
              f"{e.device_time_total / e.count:7.2f} us  {e.key[:80]}")


# ---- HF transformers on the same weights ----


def hf_model(ours, shape: dict):
    """A LlamaForCausalLM whose parameters are views of ours (no second copy)."""
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {k: v for k, v in shape.items() if k not in ("architectures", "model_type")}
    hcfg = LlamaConfig(**kw, attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    c = ours.cfg

    def put(path: str, tensor: torch.Tensor) -> None:
        hf.get_submodule(path).weight = nn.Parameter(tensor, requires_grad=False)

    put("model.embed_tokens", ours.embed.weight)
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.qkv.weight.split([c.q_size, c.kv_size, c.kv_size])  # row views
        gate, up = layer.mlp.gate_up.weight.split([c.intermediate_size] * 2)
        for name, t in (
            ("self_attn.q_proj", q),
            ("self_attn.k_proj", k),
            ("self_attn.v_proj", v),
            ("self_attn.o_proj", layer.attn.o.weight),
            ("mlp.gate_proj", gate),
            ("mlp.up_proj", up),
            ("mlp.down_proj", layer.mlp.down.weight),
            ("input_layernorm", layer.attn_norm.weight),
            ("post_attention_layernorm", layer.mlp_norm.weight),
        ):
            put(p + name, t)
    put("model.norm", ours.norm.weight)
    put("lm_head", ours.lm_head.weight)
    device = ours.embed.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hcfg).to(device)  # its buffers were meta
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF model still has meta tensors: {left[:5]}")
    return hf.eval()


class StepClock:
    """A generate() streamer that timestamps every token handed to it (one per step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())  # generate moved the tokens to the host: synced

    def end(self) -> None:
        pass

    def decode_ms(self) -> float:
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:])]  # [0]=prompt, [1]=prefill
        return 1e3 * statistics.median(gaps[1:] if len(gaps) > 2 else gaps)


def hf_step_ms(hf, batch: int, ctx: int, new_tokens: int, vocab: int, mode: str) -> dict:
    """mode: eager (dynamic cache) | static (static cache, no compile) | compile."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (batch, ctx - 1), generator=g).cuda()
    kw = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
    )
    if mode != "eager":
        kw["cache_implementation"] = "static"
    if mode == "static":
        kw["disable_compile"] = True
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(ids, **kw)  # warm-up; with mode=compile this is where it compiles
        sync()
        first_s = time.perf_counter() - t0
        clock = StepClock()
        hf.generate(ids, streamer=clock, **kw)
        sync()
    return {"step_ms": clock.decode_ms(), "first_call_s": first_s}


# ---- kernels ----


def decode_attention_bw(cfg: ModelConfig, batch: int, ctx: int, kv: str, psize: int) -> dict:
    from kernels.ops import decode_attention

    pages = batch * ctx // 16
    shape = (2, pages, 16, cfg.num_kv_heads, cfg.head_dim)
    if kv == "int8":
        data = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
        scales = torch.empty(shape[:4], device="cuda").uniform_(0.005, 0.02)
    else:
        data, scales = torch.randn(shape, dtype=torch.bfloat16, device="cuda"), None
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(pages, device="cuda").view(batch, ctx // 16).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    def call():
        return decode_attention(q, data, scales, tables, lens, partition_size=psize)

    ms = graph_ms(call)
    nbytes = data.numel() * data.element_size() + (0 if scales is None else scales.numel() * 4)
    return {"ms": ms, "eager_ms": event_ms(call, iters=30), "bytes": nbytes,
            "gbps": nbytes / (ms * 1e-3) / 1e9}


def sdpa_decode_ms(cfg: ModelConfig, batch: int, ctx: int) -> float:
    import torch.nn.functional as F

    q = torch.randn(batch, cfg.num_heads, 1, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, cfg.num_kv_heads, ctx, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    return graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def prefill_tflops(batch=4, seq=4096, heads=32, head_dim=128, rounds=5) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.ops import prefill_attention

    flops = 2.0 * batch * heads * seq * seq * head_dim  # causal: half of 4 * B * H * S^2 * D
    dev, bf16 = "cuda", torch.bfloat16
    q = torch.randn(batch * seq, heads, head_dim, dtype=bf16, device=dev)  # [T, H, D]
    pages_per_seq = seq // 16
    data = torch.randn(2, batch * pages_per_seq, 16, heads, head_dim, dtype=bf16, device=dev)
    tables = torch.randperm(batch * pages_per_seq, device=dev).view(batch, -1).to(torch.int32)
    cu = torch.arange(0, batch + 1, device=dev, dtype=torch.int32) * seq
    lens = torch.full((batch,), seq, dtype=torch.int32, device=dev)
    qs = torch.randn(batch, heads, seq, head_dim, dtype=bf16, device=dev)
    ks, vs = torch.randn_like(qs), torch.randn_like(qs)

    def sdpa(backend):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    runs = {"ours_paged": lambda: prefill_attention(q, data, None, tables, cu, lens, seq)}
    for name, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        try:
            sdpa(backend)
            runs[name] = functools.partial(sdpa, backend)
        except Exception as exc:  # noqa: BLE001 - a backend missing on this build
            progress(f"{name} unavailable: {exc!r}")
    # interleaved rounds: the GPU's clocks drift over a run by more than the gaps compared
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(event_ms(fn, iters=10))
    out = {name: None for name in ("ours_paged", "sdpa_flash", "sdpa_cudnn")}
    out.update({name: flops / (statistics.median(ms) * 1e-3) / 1e12 for name, ms in times.items()})
    return out


# ---- sections ----


def section_smollm2(args, bw: float, hf_jobs: list) -> None:
    shape = smollm2_135m()
    cfg = ModelConfig.from_hf(shape)
    model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    engine = build_engine(cfg, model, args, num_pages=2048, max_seqs=args.max_graph_bs)
    graphs = engine.runner.graphs
    nb = len(graphs.buckets) if graphs else 0
    emit("warmup", "smollm2", warmup_s=engine.warmup_seconds, buckets=nb)
    row("SmolLM2 warm-up (kernels + capture)", engine.warmup_seconds, "s", f"{nb} graph buckets")
    first = first_request(engine)
    emit("first_request", "smollm2", **first)
    row(
        "SmolLM2 first request: prefill 128 tok",
        first["prefill_ms"],
        "ms",
        "first step after warm-up",
    )
    row("SmolLM2 first request: 1st decode step", first["first_decode_ms"], "ms", "")
    row("SmolLM2 first request: steady decode", first["steady_decode_ms"], "ms", "median, 2nd half")
    n = first["agains"]
    row("SmolLM2 same request again: prefill", first["again_prefill_ms"], "ms",
        f"median of {n}, max {first['again_prefill_max_ms']:.2f}")
    row("SmolLM2 same request again: 1st decode", first["again_first_decode_ms"], "ms",
        f"median of {n}, max {first['again_first_decode_max_ms']:.2f}")
    row("SmolLM2 same request again: steady", first["again_steady_decode_ms"], "ms", f"median of {n}")
    for n in (77, 600):
        row(f"SmolLM2 prefill {n} tok: first / again", first[f"prefill_{n}_first_ms"], "ms",
            f"again {first[f'prefill_{n}_again_ms']:.2f} ms")
    fill_cache_random(engine)
    ctx = args.ctx
    g = ours_step_ms(engine, 1, ctx, args.iters)
    e = ours_step_ms(engine, 1, ctx, args.iters, graphs=False)
    floor = step_bytes(cfg, 2, 1, ctx, kv_bytes_per_elem("bf16", cfg.head_dim) * cfg.head_dim) / bw
    emit("smollm2_b1", "ours", graph_ms=g, eager_ms=e, floor_ms=1e3 * floor, ctx=ctx)
    row(
        f"SmolLM2 b1 ctx{ctx}: ours {mode(engine)}", g, "ms/step", f"{g / (1e3 * floor):.2f}x floor"
    )
    row(f"SmolLM2 b1 ctx{ctx}: ours eager", e, "ms/step", "")
    row(f"SmolLM2 b1 ctx{ctx}: floor", 1e3 * floor, "ms/step", "bytes / copy bw")
    loop = engine_loop_rows("SmolLM2", engine, ctx, args.iters, 1e3 * floor)
    guarded("SmolLM2 GEMV vs cuBLAS", gemv_rows_ab, "SmolLM2", engine, ctx, args.iters, 1e3 * floor)
    if args.profile_dir:
        path = guarded("profile", profile_steps, engine, args.profile_dir, args.profile_steps, 1, ctx)
        if path:
            emit("profile", "smollm2", path=path)
    if not args.skip_hf:
        hf = guarded("HF model (SmolLM2)", hf_model, model, shape)
        if hf is not None:
            r = guarded(
                "SmolLM2 HF eager", hf_step_ms, hf, 1, ctx, args.hf_tokens, cfg.vocab_size, "eager"
            )
            if r:
                emit("smollm2_b1", "hf_eager", **r)
                row(
                    f"SmolLM2 b1 ctx{ctx}: HF eager",
                    r["step_ms"],
                    "ms/step",
                    f"ours graph {r['step_ms'] / g:.1f}x faster",
                )
            hf_jobs.append(("SmolLM2", hf, cfg, {"graph step": g, "engine loop": loop}))
    del engine
    free()


def engine_loop_rows(label: str, engine: LLMEngine, ctx: int, steps: int, floor_ms: float) -> float:
    """Rows for the engine loop's per-token time at batch 1, run-ahead on and off (interleaved,
    median of 3 rounds each). -> the run-ahead figure."""
    on, off = [], []
    for _ in range(3):
        on.append(loop_step_ms(engine, ctx, steps, True))
        off.append(loop_step_ms(engine, ctx, steps, False))
    on_ms, off_ms = statistics.median(on), statistics.median(off)
    emit(f"{label.lower()}_b1", "engine_loop", run_ahead_ms=on_ms, no_run_ahead_ms=off_ms,
         floor_ms=floor_ms, ctx=ctx)
    row(f"{label} b1 ctx{ctx}: ours engine loop, run-ahead", on_ms, "ms/token",
        f"{on_ms / floor_ms:.2f}x floor")
    row(f"{label} b1 ctx{ctx}: ours engine loop, no run-ahead", off_ms, "ms/token",
        f"{off_ms / floor_ms:.2f}x floor")
    return on_ms


def gemv_rows_ab(label: str, engine: LLMEngine, ctx: int, steps: int, floor_ms: float) -> None:
    """Batch-1 rows for the linear layers through kernels/gemv.py against cuBLAS: a second
    set of decode graphs (buckets up to 4) with the engine's GEMV setting flipped, over the
    same model and cache; replays (CUDA events) and the engine loop, interleaved, medians
    of 3 rounds. The engine's own setting is EngineConfig.gemv (auto: MINIINFER_GEMV)."""
    import dataclasses

    from decode.graphs import CudaGraphRunner
    from engine.llm import GEMV_ON_ROWS

    base = engine.runner.graphs
    if base is None:
        return
    own = engine.backend.gemv_rows
    other = CudaGraphRunner(engine.runner.model, engine.cache,
                            dataclasses.replace(engine.backend, gemv_rows=0 if own else GEMV_ON_ROWS),
                            4, engine.max_model_len, prefetch=base.prefetch)
    other.capture()
    sets = {"GEMV" if own else "cuBLAS": base, "cuBLAS" if own else "GEMV": other}
    sb = decode_batch(engine, 1, ctx)
    try:
        logits_of_each(engine, sets, sb)
        replay = replay_rounds(sets, 1, 3, steps)
    finally:
        release(engine, sb)
    loop = loop_rounds(engine, sets, ctx, steps)
    med = {k: (statistics.median(replay[k]), statistics.median(loop[k])) for k in sets}
    emit(f"{label.lower()}_b1", "gemv_ab", ctx=ctx, floor_ms=floor_ms, engine_gemv_rows=own,
         **{f"{k.lower()}_{what}_ms": v[i] for k, v in med.items() for i, what in enumerate(("replay", "loop"))})
    for k, (r, lp) in med.items():
        row(f"{label} b1 ctx{ctx}: replay / engine loop, linears {k}", r, "ms/step",
            f"loop {lp:.3f} ms = {lp / floor_ms:.2f}x floor")


def section_8b(args, bw: float, hf_jobs: list) -> None:
    shape = llama3_8b()
    cfg = ModelConfig.from_hf(shape)
    t0 = time.perf_counter()
    model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    sync()
    progress(f"8B weights on GPU in {time.perf_counter() - t0:.1f}s")
    big_b, big_ctx = 32, args.long_ctx
    pages = max(big_b * big_ctx, 128 * 1024) // 16 + 256
    engine = build_engine(cfg, model, args, num_pages=pages, max_seqs=128)
    nb = len(engine.runner.graphs.buckets) if engine.runner.graphs else 0
    emit("warmup", "llama3_8b", warmup_s=engine.warmup_seconds, buckets=nb)
    row("8B warm-up (kernels + capture)", engine.warmup_seconds, "s", f"{nb} graph buckets")
    fill_cache_random(engine)
    ctx = args.ctx
    g = ours_step_ms(engine, 1, ctx, args.iters)
    e = ours_step_ms(engine, 1, ctx, args.iters, graphs=False)
    floor = 1e3 * step_bytes(cfg, 2, 1, ctx, 2.0 * cfg.head_dim) / bw
    emit("8b_b1", "ours", graph_ms=g, eager_ms=e, floor_ms=floor, ctx=ctx)
    row(f"8B b1 ctx{ctx}: ours {mode(engine)}", g, "ms/step", f"{g / floor:.2f}x floor")
    row(f"8B b1 ctx{ctx}: ours eager", e, "ms/step", "")
    row(f"8B b1 ctx{ctx}: floor", floor, "ms/step", "bytes / copy bw")
    loop = engine_loop_rows("8B", engine, ctx, args.iters, floor)
    guarded("8B GEMV vs cuBLAS", gemv_rows_ab, "8B", engine, ctx, args.iters, floor)
    if args.profile_dir:
        path = guarded("profile 8B", profile_steps, engine, args.profile_dir, args.profile_steps, 1, ctx, "8b")
        if path:
            emit("profile", "llama3_8b", path=path)
    hf = None if args.skip_hf else guarded("HF model (8B)", hf_model, model, shape)
    if hf is not None:
        r = guarded("8B HF eager", hf_step_ms, hf, 1, ctx, args.hf_tokens, cfg.vocab_size, "eager")
        if r:
            emit("8b_b1", "hf_eager", **r)
            row(
                f"8B b1 ctx{ctx}: HF eager",
                r["step_ms"],
                "ms/step",
                f"ours graph {r['step_ms'] / g:.1f}x faster",
            )
    # batch sweep at context 1k: ours (graph), then HF static cache (no compile) once our
    # engine's KV pool is freed (beside it, HF's batch-128 cache did not fit an 80 GB H100)
    ours = {}
    for b in args.batches:
        ms = ours[b] = ours_step_ms(engine, b, 1024, args.iters)
        emit("8b_sweep", "ours", batch=b, ctx=1024, step_ms=ms, tok_s=1e3 * b / ms)
        row(f"8B b{b} ctx1024: ours {mode(engine)}", ms, "ms/step", f"{1e3 * b / ms:.0f} tok/s")
    # int8 vs bf16 KV: whole step at batch 32, long context (bf16 on this engine)
    bf = ours_step_ms(engine, big_b, big_ctx, args.iters)
    del engine
    free()
    for b in args.batches if hf is not None else ():
        r = guarded(f"8B b{b} HF static", hf_step_ms, hf, b, 1024, 6, cfg.vocab_size, "static")
        if r:
            emit("8b_sweep", "hf_static", batch=b, ctx=1024, tok_s=1e3 * b / r["step_ms"], **r)
            row(
                f"8B b{b} ctx1024: HF static",
                r["step_ms"],
                "ms/step",
                f"{1e3 * b / r['step_ms']:.0f} tok/s; ours {r['step_ms'] / ours[b]:.1f}x",
            )
        free()
    engine8 = build_engine(
        cfg, model, args, kv_dtype="int8", num_pages=big_b * big_ctx // 16 + 64, max_seqs=big_b
    )
    fill_cache_random(engine8)
    i8 = ours_step_ms(engine8, big_b, big_ctx, args.iters)
    del engine8
    free()
    emit("8b_kv", "whole_step", batch=big_b, ctx=big_ctx, bf16_ms=bf, int8_ms=i8, speedup=bf / i8)
    row(f"8B b{big_b} ctx{big_ctx}: step, bf16 KV", bf, "ms/step", "graph")
    row(
        f"8B b{big_b} ctx{big_ctx}: step, int8 KV",
        i8,
        "ms/step",
        f"{bf / i8:.2f}x faster than bf16 KV",
    )
    engine_psize = decode_partition_size(big_b, cfg.num_kv_heads)
    for kv in ("int8", "bf16"):
        for psize in sorted({engine_psize, 512}):
            r = decode_attention_bw(cfg, big_b, big_ctx, kv, psize)
            emit(
                "decode_attention",
                kv,
                batch=big_b,
                ctx=big_ctx,
                partition=psize,
                copy_gbps=bw / 1e9,
                **r,
            )
            row(
                f"decode attn {kv} b{big_b} ctx{big_ctx} part{psize} (1 layer, in a graph)",
                r["ms"],
                "ms",
                f"{r['gbps']:.0f} GB/s = {1e9 * r['gbps'] / bw:.0%} of copy bw; "
                f"eager {r['eager_ms']:.2f}",
            )
            free()
    s = guarded("SDPA decode", sdpa_decode_ms, cfg, big_b, big_ctx)
    if s:
        nbytes = 2 * big_b * big_ctx * cfg.num_kv_heads * cfg.head_dim * 2
        emit("decode_attention", "sdpa_bf16_contiguous", ms=s, gbps=nbytes / (s * 1e-3) / 1e9)
        row(
            f"decode attn SDPA bf16 contiguous b{big_b} ctx{big_ctx} (in a graph)",
            s,
            "ms",
            f"{nbytes / (s * 1e-3) / 1e9:.0f} GB/s",
        )
    free()
    if hf is not None:
        hf_jobs.append(("8B", hf, cfg, {"graph step": g, "engine loop": loop}))


def section_prefill() -> None:
    r = prefill_tflops()
    emit("prefill_attention", "causal_4096_hd128_b4_h32", **r)
    for name, v in r.items():
        row(f"prefill attn causal S4096 D128 B4 H32: {name}", v, "TFLOP/s", "")
    free()


def section_hf_compile(args, hf_jobs: list) -> None:
    """HF static cache + torch.compile at batch 1 (compile is slow: last, and only here)."""
    for label, hf, cfg, ours_ms in hf_jobs:
        if time.perf_counter() - T0 > args.time_budget_s:
            row(f"{label} b1: HF static+compile", None, "", "skipped: time budget")
            continue
        r = guarded(
            f"{label} HF static+compile",
            hf_step_ms,
            hf,
            1,
            args.ctx,
            args.hf_tokens,
            cfg.vocab_size,
            "compile",
        )
        if r:
            emit("hf_compile", label, ctx=args.ctx, **r)
            faster = "; ".join(f"ours {k} {r['step_ms'] / v:.2f}x faster" for k, v in ours_ms.items())
            row(
                f"{label} b1 ctx{args.ctx}: HF static+compile",
                r["step_ms"],
                "ms/step",
                f"first call {r['first_call_s']:.0f}s; {faster}",
            )
        torch._dynamo.reset()
        free()


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="run our decode steps eagerly")
    p.add_argument("--ctx", type=int, default=512, help="context of the batch-1 rows")
    p.add_argument("--long-ctx", type=int, default=8192, help="context of the int8/bf16 KV rows")
    p.add_argument("--batches", default="1,8,32,128", help="batch sweep at context 1024 (8B)")
    p.add_argument("--iters", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--hf-tokens", type=int, default=24, help="tokens per HF generate call")
    p.add_argument(
        "--max-graph-bs", type=int, default=256, help="largest captured bucket (SmolLM2)"
    )
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=330.0,
        help="skip HF compile baselines once the run has taken this long",
    )
    p.add_argument("--profile-dir", default=None, help="write a torch profiler trace here")
    p.add_argument("--profile-steps", type=int, default=3)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_decode.py needs a CUDA device")
    torch.manual_seed(0)
    import transformers
    import triton

    dev = torch.cuda.get_device_name()
    emit(
        "machine",
        "device",
        device=dev,
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        cuda_graphs=not args.no_cuda_graph,
    )
    bw = copy_bandwidth()
    emit("floor", "copy_bandwidth", gbps=bw / 1e9)
    row("device copy bandwidth (read + write)", bw / 1e9, "GB/s", dev)
    hf_jobs: list = []
    guarded("SmolLM2 section", section_smollm2, args, bw, hf_jobs)
    free()
    guarded("prefill attention", section_prefill)
    if not args.skip_8b:
        guarded("8B section", section_8b, args, bw, hf_jobs)
    free()
    if not args.skip_hf:
        guarded("HF compile", section_hf_compile, args, hf_jobs)
    emit("done", "total", seconds=time.perf_counter() - T0)
    print()
    print(
        f"# GPU decode on {dev}, torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}; {time.perf_counter() - T0:.0f}s"
    )
    print(format_table(["measurement", "value", "unit", "note"], ROWS))


if __name__ == "__main__":
    main()
