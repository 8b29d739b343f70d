"""Few-row linear layers: kernels/gemv.py against cuBLAS (`F.linear`), then whole decode steps.

Part 1 (kernels): for every linear layer of the model shapes (qkv, o, gate_up, down, LM
head), bf16, at each row count, the median time of one product inside a CUDA graph of
back-to-back calls over weight copies that together exceed L2 several times over (so each
call reads its weight from HBM, as in a decode step). Bandwidth = weight bytes / time,
also as a fraction of the measured copy bandwidth (read + write bytes of a large copy_).
gate_up is compared as the MLP needs it: cuBLAS + the SiLU-and-mul kernel against the
GEMV with SiLU-and-mul fused. --sweep also times (BLOCK_N, BLOCK_K, warps, REDUCE_EACH)
configs of a grid (`sweep_grid`: shuffled, so a budget cut still samples all of it) at each
row count for --sweep-budget-s seconds, and prints the best (keep --rows short).

Part 2 (--engine): one engine per model shape with the GEMV off; a second set of decode
graphs captured over the same model and cache with it on and the norms in their own
kernels; one with each residual add + RMSNorm in the GEMVs as well (kernels.gemv.fuses_norm:
SmolLM2's width, in the GEMV after it; splits_norm: the 8B shape's, split between the GEMVs
around it), whatever the defaults; for wide models the split again with gate_up's
registers capped at 80 (kernels.gemv.SPLIT_MAXNREG) and with the norm's scale after the
GEMVs' loops (SPLIT_SCALE_AFTER), and, launched with PDL, one with the
shipped norm mode and each GEMV's first weight tiles (one K step, then two) prefetched into
L2 before its PDL wait (kernels.gemv.EARLY_PREFETCH), then one step with decode attention's
reduce kernel also asking for the o weight's first 8 MiB (kernels.prefetch.AHEAD_BYTES); and with --sweep one with each layer's best swept config
(kernels.gemv.TUNED, filled for that capture only). Logits are compared with cuBLAS's (max
abs difference, greedy agreement), then replays are timed interleaved, and the engine loop
(run-ahead on, batch 1) per token with each set. --profile N also profiles N batch-1
replays of each set and prints what each kernel adds to the step (bench/kernel_trace.py).

    python bench/gemv.py [--models smollm2-135m,llama3-8b] [--rows 1,2,4,8,16] [--sweep]
        [--sweep-budget-s 30] [--engine] [--gemv-rows 4] [--ctx 512] [--batches 1,4]
        [--profile STEPS]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import random
import statistics
import sys
import time
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import format_table, ints, progress  # noqa: E402
from bench.gpu_decode import (  # noqa: E402
    ab_engine,
    copy_bandwidth,
    decode_batch,
    graph_ms,
    logits_of_each,
    loop_rounds,
    release,
    replay_rounds,
    step_bytes,
)
from bench.kernel_trace import print_step_table, trace_kernels  # noqa: E402
from bench.shapes import SHAPES, shape  # noqa: E402
from engine.config import ModelConfig  # noqa: E402

L2_MULTIPLE = 256 << 20  # weight copies per shape add up to at least this (H100 L2: 50 MiB)


def layer_shapes(cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, gated) of every linear layer a decode step runs."""
    c = cfg
    return [
        ("qkv", c.q_size + 2 * c.kv_size, c.hidden_size, False),
        ("o", c.hidden_size, c.q_size, False),
        ("gate_up", 2 * c.intermediate_size, c.hidden_size, True),
        ("down", c.hidden_size, c.intermediate_size, False),
        ("lm_head", c.vocab_size, c.hidden_size, False),
    ]


def graph_us(fns, reps: int = 4, iters: int = 15) -> float:
    """Median us of one call among the fns (each over its own weight copy), called in turn
    reps times over from one CUDA graph (bench.gpu_decode.graph_ms)."""
    turn = itertools.cycle(fns)
    return 1e3 * graph_ms(lambda: next(turn)(), calls=reps * len(fns), iters=iters)


def _blas(x, w, gated: bool):
    from kernels.activation import silu_and_mul

    return silu_and_mul(F.linear(x, w)) if gated else F.linear(x, w)


def _gb_per_s(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


SWEEP_BLOCK_N = (1, 2, 4, 8)
SWEEP_BLOCK_K = (256, 512, 1024, 2048, 4096)
SWEEP_WARPS = (4, 8)
SWEEP_MARGIN = 0.98  # a swept config is kept only if at least 2% faster than the default, retimed
SWEEP_MAX_PER_THREAD = 128  # fp32 values a thread may hold of one K step's tile


def per_thread(m: int, gated: bool, cfg: tuple[int, int, int, bool]) -> int:
    """fp32 values a thread holds for one K step: the weight tile (gate and up rows when
    gated) and, without REDUCE_EACH, one product lane per row of x as well."""
    block_n, block_k, warps, reduce_each = cfg
    tile = block_n * block_k * (2 if gated else 1) // (32 * warps)
    return tile if reduce_each else tile * _next_pow2(m)


def sweep_grid(m: int, k: int, gated: bool = False, seed: int = 0) -> list[tuple[int, int, int, bool]]:
    """The (BLOCK_N, BLOCK_K, warps, REDUCE_EACH) a sweep tries at m rows and this K, in a
    seeded random order, so that a time budget that cuts it short still samples all of it.
    BLOCK_K up to K's next power of two (one step: each program's whole row at once);
    REDUCE_EACH both ways above 2 rows. Configs whose threads would hold more than
    SWEEP_MAX_PER_THREAD values are left out: they spill (thousands of spill stores at
    8 x 4096 over 4 rows, offline under Triton 3.6) and took up to 29 s to compile."""
    widths = [w for w in SWEEP_BLOCK_K if w <= max(SWEEP_BLOCK_K[0], _next_pow2(k))]
    reduce = (False,) if m <= 2 else (True, False)
    grid = [c for c in itertools.product(SWEEP_BLOCK_N, widths, SWEEP_WARPS, reduce)
            if per_thread(m, gated, c) <= SWEEP_MAX_PER_THREAD]
    random.Random(seed).shuffle(grid)
    return grid


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def sweep_best(fns_for, default_us: float, grid, budget_s: float, label: str):
    """Time configs of the grid (fns_for(cfg) -> the calls to time) until budget_s has passed.
    -> (best us, best config or None where none beat the default, configs timed)."""
    best_us, best_cfg, tried = default_us, None, 0
    deadline = time.monotonic() + budget_s
    for cfg_ in grid:
        if time.monotonic() > deadline:
            break
        try:
            us = graph_us(fns_for(cfg_), reps=2, iters=8)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or launch
            print(f"# {label} {cfg_}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            continue
        tried += 1
        if us < best_us:
            best_us, best_cfg = us, cfg_
    return best_us, best_cfg, tried


def kernel_rows(cfg: ModelConfig, model: str, rows: list[int], sweep: bool, bw: float,
                budget_s: float = 30.0, tuned: dict | None = None) -> list[list]:
    """The per-layer table. With sweep, each (layer, rows)'s best config that beat the
    default goes into `tuned` under kernels.gemv.TUNED's key."""
    from kernels.gemv import gemv, gemv_reference, gemv_with_config

    out = []
    for name, n, k, gated in layer_shapes(cfg):
        nbytes = n * k * 2
        copies = max(2, -(-L2_MULTIPLE // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = gemv_reference(x, ws[0], gated=gated).float()
            got = gemv(x, ws[0], gated=gated).float()
            err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            blas = [partial(_blas, x, w, gated) for w in ws]
            ours = [partial(gemv, x, w, None, gated) for w in ws]
            t_blas, t_ours = [], []
            for _ in range(3):  # interleaved rounds
                t_blas.append(graph_us(blas))
                t_ours.append(graph_us(ours))
            tb, to = statistics.median(t_blas), statistics.median(t_ours)
            best = ""
            if sweep:
                grid = sweep_grid(m, k, gated)

                def fns_for(c, x=x, ws=ws, gated=gated):
                    return [partial(gemv_with_config, x, w, None, gated, c) for w in ws]

                best_us, best_cfg, tried = sweep_best(fns_for, to, grid, budget_s, f"{model} {name} m{m}")
                kept = None
                if best_cfg is not None:  # one short sample each: time it again against the default
                    t_def, t_best = [], []
                    for _ in range(3):
                        t_def.append(graph_us(ours))
                        t_best.append(graph_us(fns_for(best_cfg)))
                    best_us = statistics.median(t_best)
                    if best_us < SWEEP_MARGIN * statistics.median(t_def):
                        kept = best_cfg
                best = f"{best_us:.2f} {best_cfg or 'default'}{'' if kept or not best_cfg else ' (not kept)'}"
                best += f" ({tried}/{len(grid)})"
                if kept is not None and tuned is not None:
                    tuned[(_next_pow2(m), n // 2 if gated else n, k, gated)] = kept
            gbs = partial(_gb_per_s, nbytes)
            out.append([model, name + ("+silu" if gated else ""), f"{n}x{k}", m, f"{tb:.2f}", f"{to:.2f}",
                        f"{tb / to:.3f}", f"{gbs(tb):.0f}", f"{gbs(to):.0f}",
                        f"{gbs(to) / (bw / 1e9):.2f}", f"{err:.1e}", best])
            progress(f"{model} {name} m{m}: cuBLAS {tb:.2f} us, gemv {to:.2f} us")
        del ws
        torch.cuda.empty_cache()
    return out


def _graph_set(model, engine, backend, max_bs: int, prefetch):
    """Decode graphs over the engine's model and cache, captured with `backend`."""
    from decode.graphs import CudaGraphRunner

    g = CudaGraphRunner(model, engine.cache, backend, max_bs, engine.max_model_len, prefetch=prefetch)
    g.capture()
    return g


ENGINE_HEADERS = ["model", "step", "linear layers", "ms", "x floor", "speed-up", "logit diff / greedy agree"]


def profile_sets(engine, variants: dict, name: str, ctx: int, steps: int) -> None:
    """Each graph set's batch-1 replay, `steps` of them traced: what each kernel adds."""
    sb = decode_batch(engine, 1, ctx)
    try:
        logits_of_each(engine, variants, sb)  # each set's inputs for this batch
        for label, runner in variants.items():
            events = trace_kernels(runner.graphs[runner.bucket_for(1)].replay, steps)
            print_step_table(f"{name} replay b1, {label}", events, steps)
    finally:
        release(engine, sb)


def engine_rows(name: str, a, bw: float, tuned: dict | None = None) -> list[list]:
    """Decode graphs with the linear layers on cuBLAS; on the GEMV with its default configs,
    the norms in their own kernels and then in the GEMVs (fused or split, as the model's
    width takes them; for wide rows the split's variants too), and for wide PDL models with
    the early weight prefetch; and (where `tuned` holds a sweep's best configs) on the GEMV
    with those; side by side, printed as a table (then, with a.profile, each batch-1 set's
    kernels)."""
    import kernels.gemv
    import kernels.prefetch

    cfg, model, engine = ab_engine(name, a.batches, a.ctx, a.loop_steps, gemv="off")
    max_bs = max(a.batches)
    base = engine.runner.graphs
    backend = dataclasses.replace(engine.backend, gemv_rows=a.gemv_rows)
    captured = partial(_graph_set, model, engine, backend, max_bs, base.prefetch)
    g = kernels.gemv
    gemv = f"gemv<={a.gemv_rows}"
    # kernels.gemv's settings for each set, whatever the module's defaults: the residual adds +
    # norms in their own kernels; in the GEMVs (in the one after each for narrow rows, split
    # between the ones around each for wide rows); for wide rows the split again with
    # gate_up's registers capped at 80 (6 programs an SM, not 5), and with the scale after
    # the loops (the plain GEMV's registers); and (their models launch with PDL: the
    # prefetch needs it) the shipped mode with each GEMV's first weight tile (or two) asked
    # of L2 before its PDL wait, and with that plus decode attention's reduce kernel asking
    # for the o weight's first 8 MiB before its own (kernels.prefetch.AHEAD_BYTES)
    narrow = g.fuses_norm(cfg.hidden_size)
    plain = {"NORM_MAX_K": g.NORM_MAX_K, "SPLIT_NORM": False, "EARLY_PREFETCH": 0,
             "SPLIT_MAXNREG": {}, "SPLIT_SCALE_AFTER": False, "AHEAD_BYTES": 0}
    home = {key: kernels.prefetch if key == "AHEAD_BYTES" else g for key in plain}
    apart, fused = {**plain, "NORM_MAX_K": 0}, {**plain, "SPLIT_NORM": not narrow}
    modes = {"norms apart": apart, "norms fused" if narrow else "norms split": fused}
    if not narrow:
        modes["norms split, gate_up <= 80 regs"] = {**fused, "SPLIT_MAXNREG": {True: 80}}
        modes["norms split, scale after"] = {**fused, "SPLIT_SCALE_AFTER": True}
        if backend.pdl is not False:
            shipped = fused if g.SPLIT_NORM else apart
            modes["shipped norms, early prefetch"] = {**shipped, "EARLY_PREFETCH": 1}
            modes["shipped norms, early prefetch x2"] = {**shipped, "EARLY_PREFETCH": 2}
            modes["shipped norms, early prefetch, o ahead 8 MiB"] = {**shipped, "EARLY_PREFETCH": 1,
                                                                     "AHEAD_BYTES": 8 << 20}
    variants = {"cuBLAS": base}
    for label, settings in modes.items():  # read at capture only
        with contextlib.ExitStack() as stack:
            for key, value in settings.items():
                stack.enter_context(mock.patch.object(home[key], key, value))
            variants[f"{gemv}, {label}"] = captured()
    if tuned:
        kernels.gemv.TUNED.update(tuned)  # read at capture only: the graphs keep the launches
        try:
            variants[f"{gemv} swept"] = captured()
        finally:
            kernels.gemv.TUNED.clear()
    out = []
    for b in a.batches:
        sb = decode_batch(engine, b, a.ctx)
        logits = logits_of_each(engine, variants, sb)
        ref = logits["cuBLAS"]
        times = replay_rounds(variants, b, a.rounds, a.iters)
        release(engine, sb)
        floor = step_bytes(cfg, 2, b, a.ctx, 2.0) / bw * 1e3
        first = statistics.median(times["cuBLAS"])
        for label in variants:
            ms = statistics.median(times[label])
            diff = (logits[label] - ref).abs().max().item()
            agree = (logits[label].argmax(-1) == ref.argmax(-1)).float().mean().item()
            out.append([name, f"replay b{b}", label, f"{ms:.4f}", f"{ms / floor:.3f}", f"{first / ms:.3f}",
                        f"{diff:.3g} / {agree:.2f}"])
        progress(f"{name} b{b} done")
    loops = loop_rounds(engine, variants, a.ctx, a.loop_steps)
    floor = step_bytes(cfg, 2, 1, a.ctx, 2.0) / bw * 1e3
    first = statistics.median(loops["cuBLAS"])
    for label in variants:
        ms = statistics.median(loops[label])
        out.append([name, "loop b1", label, f"{ms:.4f}", f"{ms / floor:.3f}", f"{first / ms:.3f}", ""])
    print(format_table(ENGINE_HEADERS, out), flush=True)  # before the profiles, which may be cut
    if a.profile:  # last: the profiler may slow what runs after it
        profile_sets(engine, variants, name, a.ctx, a.profile)
    del engine, model, base, variants, captured
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--rows", default="1,2,4,8,16", help="row counts for the kernel table")
    ap.add_argument("--sweep", action="store_true",
                    help="time a grid of kernel configs at each row count; with --engine, the best "
                         "ones also get their own set of decode graphs")
    ap.add_argument("--sweep-budget-s", type=float, default=30.0,
                    help="seconds of sweeping per layer and row count (default %(default)s)")
    ap.add_argument("--no-kernels", action="store_true", help="skip part 1")
    ap.add_argument("--engine", action="store_true", help="part 2: whole decode steps")
    ap.add_argument("--gemv-rows", type=int, default=4, help="part 2: the most rows sent to the GEMV")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--loop-steps", type=int, default=64)
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="part 2: profile STEPS batch-1 replays of each set and print what each "
                         "kernel adds to the step (bench/kernel_trace.py); 0: none")
    a = ap.parse_args()
    names = a.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown model shape(s) {unknown}; known: {sorted(SHAPES)}")
    try:
        rows, a.batches = ints(a.rows), ints(a.batches)
    except ValueError as e:
        ap.error(str(e))
    if a.profile < 0:
        ap.error("--profile takes a number of steps (0: none)")
    if not 1 <= a.gemv_rows <= 16:
        ap.error("--gemv-rows must be in 1..16")
    if a.sweep and a.no_kernels:
        ap.error("--sweep is part 1's (no --no-kernels); with --engine it adds the swept graph set")
    if not torch.cuda.is_available():
        print("gemv.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    tuned: dict = {}
    if not a.no_kernels:
        table = []
        for name in names:
            table += kernel_rows(ModelConfig.from_hf(shape(name)), name, rows, a.sweep, bw,
                                 a.sweep_budget_s, tuned)
        print(format_table(["model", "layer", "N x K", "rows", "cuBLAS us", "gemv us", "speed-up",
                            "cuBLAS GB/s", "gemv GB/s", "gemv / copy bw", "rel err", "best config (us)"],
                           table), flush=True)
        if a.sweep:  # for kernels.gemv.TUNED / default_config
            print(f"# swept configs kept (2%+ faster than the defaults, retimed): {tuned}", flush=True)
    if a.engine:  # each model's table printed as it is done
        for name in names:
            engine_rows(name, a, bw, tuned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
