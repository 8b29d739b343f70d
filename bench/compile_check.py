"""Build every Triton kernel the engine launches on a GPU, on a machine without one.

    python bench/compile_check.py                      # sm_90 (H100 / H200), both bench shapes
    python bench/compile_check.py --shapes smollm2-135m --arch 90 --wide --strict

Runs engine steps on CPU tensors inside `kernels.aot.compile_only`: the wrappers choose the
GPU's launch configs and each launch compiles its kernel for the target (Triton, then
ptxas) instead of running. Per shape (seeded random bf16 weights, `--layers` layers, 2 by
default: layer 0 normalizes its input alone, later layers take the add + norm):
prefills of a long prompt (the 128 x 128 prefill tiles) and of short ones, then decode
steps at 1, 3 and 32 sequences, with bf16 and int8 KV, the GEMV kernel on (gemv=16, so
batch 3 takes it too) and PDL as the engine picks it for the shape. Then, at the kernel
level, what those steps do not reach on a CPU: the speculative-decoding verify kernel,
the MoE kernels, the L2 prefetch, rotary on its own, the GEMVs of the split add + norm
(and its variants) and with the early weight prefetch (kernels.gemv.SPLIT_NORM,
EARLY_PREFETCH), decode attention's reduce kernel prefetching the o weight ahead
(kernels.prefetch.AHEAD_BYTES), all off by default, and decode attention's tile
options that only TUNING takes (FAST_I8 x I8_QK x LAZY on every partition size).

Prints one row per kernel specialization built (registers, shared memory, stack and spill
stores from the bundled `cuobjdump`, compile seconds) and exits 1 when a kernel failed to build
or needs more shared memory than the target has; --strict also fails on register spills.
Which Triton builds is whatever `import triton` finds: put another version first on
PYTHONPATH to check the GPU image's (e.g. a `pip install --target` of triton==3.6.0).
Needs TRITON_INTERPRET unset. About a minute for both shapes on two cores, cache cold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import format_table  # noqa: E402

DEFAULT_SHAPES = ("smollm2-135m", "llama3-8b")


def _engine(shape_name: str, layers: int, vocab: int | None, kv_dtype: str, seqs: int):
    from bench.shapes import shape
    from engine.config import ModelConfig
    from engine.llm import EngineConfig, LLMEngine
    from engine.loader.registry import LoadedModel, random_model

    hf = shape(shape_name)
    hf["num_hidden_layers"] = layers
    if vocab:
        hf["vocab_size"] = vocab
    cfg = ModelConfig.from_hf(hf)
    model = random_model(cfg, seed=0, dtype=torch.bfloat16, device="cpu")
    config = EngineConfig(attention_backend="triton", kv_dtype=kv_dtype, num_pages=seqs * 48 + 64,
                          max_num_seqs=seqs, max_num_batched_tokens=4096, gemv="16",
                          cpu_transposed_weights=False, cpu_kernels=False, max_model_len=2048)
    return LLMEngine(LoadedModel(model, None, cfg, "random", 0.0), config, "cpu")


def engine_steps(shape_name: str, layers: int, vocab: int | None, log=print) -> None:
    """The launches of prefill and decode steps for one shape, bf16 and int8 KV."""
    from engine.sampling import SamplingParams

    gen = torch.Generator().manual_seed(0)
    for kv in ("bf16", "int8"):
        t0 = time.perf_counter()
        engine = _engine(shape_name, layers, vocab, kv, seqs=32)

        def prompts(n, length, vocab_size=engine.model_config.vocab_size):
            return torch.randint(3, vocab_size, (n, length), generator=gen).tolist()

        params = SamplingParams(max_tokens=3, ignore_eos=True)
        # one long prompt (512+: the wide prefill tiles) with short ones, then 32 decoding together
        engine.generate(prompts(1, 520) + prompts(31, 5), params)
        engine.generate(prompts(1, 40), params)  # batch-1 decode
        engine.generate(prompts(3, 17), params)  # a few rows: the GEMV's REDUCE_EACH path
        log(f"  {shape_name}, {kv} KV: engine steps in {time.perf_counter() - t0:.1f} s")


def kernel_calls(log=print) -> None:
    """Kernels the CPU engine steps do not reach: spec verify, MoE, the L2 prefetch (the
    engine's runs only inside a decode-graph capture), rotary on its own, the GEMVs of the
    split add + norm (and its variants) and with the early weight prefetch
    (kernels.gemv.SPLIT_NORM, EARLY_PREFETCH), decode attention's reduce kernel prefetching
    the o weight (kernels.prefetch.AHEAD_BYTES); all off by default."""
    import kernels.gemv
    import kernels.prefetch
    from kernels._triton import pdl_scope
    from kernels.decode_attention import decode_attention
    from kernels.gemv import gemv, gemv_add, gemv_rmsnorm_sums
    from kernels.moe import moe_gather_sum, moe_pack_rows, moe_route
    from kernels.prefetch import l2_prefetch
    from kernels.rotary import apply_rotary
    from kernels.spec_verify import spec_verify

    b, k, v = 4, 4, 49152
    logits = torch.randn(b, k + 1, v)
    drafts = torch.randint(0, v, (b, k))
    lens = torch.full((b,), k, dtype=torch.int64)
    spec_verify(logits, drafts, lens, torch.zeros(b))  # greedy rows
    temp = torch.ones(b)
    spec_verify(logits, drafts, lens, temp, torch.softmax(torch.randn(b, k, v), -1),
                torch.rand(b, k + 1), torch.rand(b, k + 1, v))  # sampled rows, draft probs
    for experts, top_k, hidden in ((128, 8, 2048), (8, 2, 4096)):  # Qwen3-30B-A3B, Mixtral
        t = 16
        router = torch.randn(t, experts, dtype=torch.bfloat16)
        moe_route(router, top_k, True)
        rows = torch.randn(t * top_k, hidden, dtype=torch.bfloat16)
        pos = torch.randint(0, t * top_k, (t, top_k), dtype=torch.int32)
        moe_gather_sum(rows, pos, torch.rand(t, top_k))
        moe_gather_sum(rows, pos)
        meta = torch.zeros(t * top_k, 2 * top_k, dtype=torch.bfloat16)
        moe_pack_rows(rows[:t], torch.arange(t * top_k, dtype=torch.int64) % t, meta)
    weight = torch.empty(4 << 20, dtype=torch.uint8)
    l2_prefetch(weight, mode="bulk")
    l2_prefetch(weight, mode="loads")
    t, d = 8, 128  # rotary alone: the engine takes the fused rotary + KV store instead
    cos, sin = torch.randn(64, d, dtype=torch.bfloat16), torch.randn(64, d, dtype=torch.bfloat16)
    q, k_ = torch.randn(t, 32, d, dtype=torch.bfloat16), torch.randn(t, 8, d, dtype=torch.bfloat16)
    positions = torch.arange(t)
    apply_rotary(positions, q, k_, cos, sin)
    apply_rotary(positions, q, k_, cos, sin, inplace=True)
    def empty(*size):  # nothing runs: only the shapes and dtypes matter
        return torch.empty(*size, dtype=torch.bfloat16)

    for rows in (1, 3):  # the add + norm split between the 8B shape's GEMVs (SPLIT_NORM, off)
        h, sums = gemv_add(empty(rows, 14336), empty(4096, 14336), empty(rows, 4096))  # down
        gemv_add(empty(rows, 4096), empty(4096, 4096), h)  # o
        gemv_rmsnorm_sums(h, sums, empty(4096), 1e-5, empty(6144, 4096))  # qkv
        gemv_rmsnorm_sums(h, sums, empty(4096), 1e-5, empty(28672, 4096), gated=True)  # gate_up
    with mock.patch.object(kernels.gemv, "SPLIT_MAXNREG", {True: 80}):  # the A/B's cap
        h, sums = gemv_add(empty(1, 14336), empty(4096, 14336), empty(1, 4096))
        gemv_rmsnorm_sums(h, sums, empty(4096), 1e-5, empty(28672, 4096), gated=True)
    with mock.patch.object(kernels.gemv, "SPLIT_SCALE_AFTER", True):  # the scale after the loop
        for rows in (1, 3):
            h, sums = gemv_add(empty(rows, 14336), empty(4096, 14336), empty(rows, 4096))
            gemv_rmsnorm_sums(h, sums, empty(4096), 1e-5, empty(6144, 4096))
            gemv_rmsnorm_sums(h, sums, empty(4096), 1e-5, empty(28672, 4096), gated=True)
    # decode attention's reduce kernel asking L2 for the o weight ahead (8B heads, int8 KV)
    with (mock.patch.object(kernels.prefetch, "AHEAD_BYTES", 8 << 20), pdl_scope(True),
          kernels.prefetch.ahead(empty(4096, 4096))):
        for b in (1, 4):
            decode_attention(empty(b, 32, 128), torch.zeros(2, 64, 16, 8, 128, dtype=torch.int8),
                             torch.ones(2, 64, 16, 8), torch.zeros(b, 16, dtype=torch.int32),
                             torch.full((b,), 200, dtype=torch.int32), partition_size=64)
    with pdl_scope(True):  # the early prefetch happens only on PDL launches
        for steps, rows in itertools.product((1, 2), (1, 3)):  # K steps asked for
            with mock.patch.object(kernels.gemv, "EARLY_PREFETCH", steps):
                gemv(empty(rows, 4096), empty(6144, 4096))
                gemv(empty(rows, 4096), empty(28672, 4096), gated=True)
    log("  kernel-level calls: spec verify, MoE route / gather-sum / pack, L2 prefetch, rotary, "
        "split norm GEMVs (gate_up also capped at 80 registers; the scale after the loop), GEMVs "
        "with the early prefetch (1 and 2 K steps), decode attention with the o weight ahead")


def tuning_variants(log=print) -> None:
    """Decode attention's GPU tile options that the launch rules leave off and TUNING (the
    tile sweeps, the GPU tests) may take: FAST_I8, I8_QK and LAZY on every partition size,
    int8 pages under bf16 and fp16 queries, the 8B shape's heads (GQA 4, D128)."""
    import kernels.decode_attention as da

    b, h, hkv, d, pages = 4, 32, 8, 128, 64
    data = torch.zeros(2, pages, 16, hkv, d, dtype=torch.int8)
    scales = torch.ones(2, pages, 16, hkv)
    tables = torch.arange(pages, dtype=torch.int32).view(b, pages // b)
    ctx = torch.full((b,), pages // b * 16 - 3, dtype=torch.int32)
    cpu_gpu = torch.device("cpu")  # stands for the GPU inside compile_only
    saved = da.TUNING
    try:
        for q_dtype in (torch.bfloat16, torch.float16):
            q = torch.randn(b, h, d).to(q_dtype)
            for partition in (64, 128, 512):
                da.TUNING = None  # the rule itself, not the last variant's TUNING
                rule = da._launch(cpu_gpu, partition, True, d, q_dtype)
                for fast, i8_qk, lazy in itertools.product((True, False), repeat=3):
                    da.TUNING = {**rule, "split_d": True, "fast_i8": fast, "i8_qk": i8_qk,
                                 "lazy": lazy}
                    da.decode_attention(q, data, scales, tables, ctx, partition_size=partition)
    finally:
        da.TUNING = saved
    log("  decode attention tile options: FAST_I8 x I8_QK x LAZY, partitions 64-512, bf16 / fp16")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help="bench.shapes names, comma-separated (default: %(default)s)")
    p.add_argument("--arch", default="90", help="compute capability to build for, e.g. 90 or 80")
    p.add_argument("--layers", type=int, default=2,
                   help="decoder layers per model (2: the first layer's norm differs; then they repeat)")
    p.add_argument("--vocab", type=int, default=0, help="override the vocabulary (0: the shape's)")
    p.add_argument("--no-kernel-calls", action="store_true",
                   help="only the engine steps (no kernel-level calls or tile options)")
    p.add_argument("--wide", action="store_true", help="print every constexpr")
    p.add_argument("--strict", action="store_true", help="also fail on register spills")
    p.add_argument("--json", metavar="PATH", help="also write what was built, failed and flagged")
    args = p.parse_args(argv)

    from kernels._triton import HAS_TRITON, interpreting

    if not HAS_TRITON:
        print("compile_check: triton is not installed", file=sys.stderr)
        return 2
    if interpreting():
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)",
              file=sys.stderr)
        return 2
    if not (args.arch.isdigit() and len(args.arch) in (2, 3)):
        print(f"compile_check: --arch must be a compute capability like 90, got {args.arch!r}",
              file=sys.stderr)
        return 2
    from bench.shapes import SHAPES

    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        print(f"compile_check: unknown shapes {unknown}; known: {sorted(SHAPES)}", file=sys.stderr)
        return 2

    import triton

    from kernels.aot import compile_only

    capability = (int(args.arch[:-1]), int(args.arch[-1]))
    print(f"# compile check: Triton {triton.__version__} building for sm_{args.arch}, "
          f"torch {torch.__version__}")
    t0 = time.perf_counter()
    with compile_only(capability, raise_errors=False) as run:
        for name in shapes:
            engine_steps(name, args.layers, args.vocab or None)
        if not args.no_kernel_calls:
            kernel_calls()
            tuning_variants()
    elapsed = time.perf_counter() - t0
    if args.wide:
        for b in run.built:
            print(f"{b.kernel}: {b.summary(width=10_000)}")
    def known(v):  # regs, stack and spills are None where no cuobjdump was found
        return "?" if v is None else v

    print(format_table(
        ["kernel", "constexprs", "warps", "stages", "regs", "smem KiB", "stack B", "spills",
         "launches", "compile s"],
        [[b.kernel, b.summary(), b.num_warps, b.num_stages,
          f"{known(b.regs)}" + (f" (cap {b.maxnreg})" if b.maxnreg else ""), f"{b.shared / 1024:.1f}",
          known(b.stack), known(b.spill_stores), b.launches, f"{b.seconds:.2f}"] for b in run.built]))
    problems = run.problems()
    fatal = run.errors() + (run.spills() if args.strict else [])
    print(f"# {len(run.built)} specializations of {len(run.kernels())} kernels built in "
          f"{elapsed:.0f} s; {len(run.failures)} failed")
    for line in problems:
        print(("ERROR " if line in fatal else "WARNING ") + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "triton_file": triton.__file__,
                       "arch": args.arch, "seconds": elapsed,
                       "built": [b.record() for b in run.built],
                       "failures": [{"kernel": k, "error": e} for k, _, e in run.failures],
                       "problems": problems}, f, indent=1)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
