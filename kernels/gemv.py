"""Linear layers for a few rows (decode): y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M <= 16.

At batch 1 a decode step is a chain of matrix-vector products that each stream one weight
from HBM, so their speed is the fraction of the memory bandwidth they reach. Each program
here owns BLOCK_N rows of the weight and walks K in BLOCK_K-wide slices. For one or two
rows the products stay in a [ROWS, BLOCK_N, BLOCK_K] fp32 accumulator that is reduced
once, after the loop; for more rows each slice is summed as it comes (REDUCE_EACH), to
keep registers. The weight is read once whatever M is; x (a few KiB) is re-read from
L1/L2 by every program.

`gated=True` is the gated MLP's up projection with its activation fused: w is [2I, K]
(gate rows, then up rows), and each program multiplies its gate rows and the matching up
rows, returning silu(gate) * up [M, I] without writing the [M, 2I] product.

Results are fp32 sums rounded once to x's dtype, in another order than cuBLAS's, so 16-bit
outputs may differ from `F.linear`'s by an ulp or so.
"""

import torch
import torch.nn.functional as F

from kernels._triton import (
    check_float,
    check_launchable,
    device_guard,
    kernel_op,
    pdl_args,
    pdl_wait,
    tl,
    triton,
)
from kernels.prefetch import bulk_prefetch_l2

MAX_ROWS = 16  # above this a GEMM (cuBLAS) is the right tool
NORM_MAX_K = 2048  # gemv_add_rmsnorm: the widest row it normalizes in its one K step
# wider rows (the 8B shape's 4096) may split the add + norm between two GEMVs instead: the
# one before adds the residual in and leaves per-program sums of squares (gemv_add), the one
# after normalizes from them (gemv_rmsnorm_sums); splits_norm. Off: on an H100 it made the
# 8B batch-1 step 1.1-1.3% slower than the 63 norm kernels it replaces (docs/PERF.md,
# twentieth session). At most SPLIT_MAX_ROWS rows: the consumer holds all the sums of its
# rows at once (8B shape, Triton 3.6, sm_90: no spill up to 8 rows; at 16, 255 registers
# and spill stores)
SPLIT_NORM = False
SPLIT_MAX_ROWS = 8
# Register caps (Triton's maxnreg) for gemv_rmsnorm_sums launches, by gated. The split's
# consumers hold more registers than the plain GEMV, so fewer programs fit an SM: gate_up 86
# against 70 (5 programs against 7; Triton 3.6, sm_90), one candidate cause of the split's
# slowdown. Capped at 80, gate_up builds without spills (6 an SM). Empty: no cap; the bench
# A/B (bench/gemv.py --engine) sets {True: 80} for one of its graph sets.
SPLIT_MAXNREG: dict[bool, int] = {}
# With SPLIT_SCALE_AFTER, gemv_rmsnorm_sums multiplies w by g * x and scales the row's sums
# by its rstd after the K loop (rmsnorm is linear in x once rstd is fixed), so the sums are
# loaded and reduced after the products, holding no registers in the loop (at one row, about
# the plain GEMV's registers: 127 and 71 for the 8B qkv and gate_up against 139 and 86 split;
# at 3-4 rows gate_up takes 87 against 80; Triton 3.6, sm_90). It leaves out the norm's two roundings of its output
# (x * rstd, then * g, each to x's dtype), so in 16-bit dtypes the result differs from
# rmsnorm then gemv by about those roundings (in fp32, by the order of operations only).
# Off: not measured yet.
SPLIT_SCALE_AFTER = False
# Launched with PDL (Hopper), a GEMV's programs can become resident while the kernel before
# still runs, and wait there (pdl_wait) for its output. The weights are no kernel's output,
# so with EARLY_PREFETCH = n each program first asks L2 for its first n K steps' weight
# tiles (cp.async.bulk.prefetch, no registers held; at most the whole row), then waits.
# 0 (off) until a GPU has measured it.
EARLY_PREFETCH = 0
# (ROWS, output columns, K, gated) -> (BLOCK_N, BLOCK_K, num_warps, REDUCE_EACH), taken over
# default_config where present (ROWS = next_power_of_2(M)). Empty unless a tuning run fills
# it: bench/gemv.py --sweep --engine captures decode graphs with its sweep's best configs.
TUNED: dict[tuple[int, int, int, bool], tuple[int, int, int, bool]] = {}


@triton.jit
def _prefetch_first_tiles(w_ptr, N, w_stride, up_offset, BLOCK_N: tl.constexpr, SPAN: tl.constexpr,
                          CHUNKS: tl.constexpr, GATED: tl.constexpr):
    """Ask L2 for this program's weight rows' first SPAN elements (and the up rows'), CHUNKS
    bulk prefetches a row; rows past N ask for row N - 1's again (harmless)."""
    rows = tl.minimum(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    step = SPAN // CHUNKS  # elements a chunk
    offs = rows.to(tl.int64)[:, None] * w_stride + (tl.arange(0, CHUNKS) * step)[None, :]
    nbytes = tl.full([BLOCK_N, CHUNKS], step * w_ptr.dtype.element_ty.primitive_bitwidth // 8, tl.int32)
    bulk_prefetch_l2((w_ptr + offs).to(tl.int64, bitcast=True), nbytes)
    if GATED:
        bulk_prefetch_l2((w_ptr + up_offset + offs).to(tl.int64, bitcast=True), nbytes)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    x_stride,
    w_stride,
    out_stride,
    up_offset,
    r_ptr,
    g_ptr,
    s_ptr,
    r_stride,
    s_stride,
    parts,
    eps,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    REDUCE_EACH: tl.constexpr,
    NORM: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREFETCH_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # NORM 1: x is rmsnorm(x + r) * g, the whole row in one K step (gemv_add_rmsnorm);
    # NORM 2: x is rmsnorm(x) * g, the row's scale from the `parts` partial sums of squares
    # at s_ptr that the GEMV before left (gemv_rmsnorm_sums); NORM 3: the same, x * g in the
    # loop and the products scaled by the row's rstd after it (SPLIT_SCALE_AFTER); ADD:
    # out = x @ w.T + r, and this program's sum of squares of its columns of out into s_ptr
    # (gemv_add); PREFETCH: chunks a weight row's first PREFETCH_K elements are asked of L2
    # in, before the wait (EARLY_PREFETCH)
    if PREFETCH:
        _prefetch_first_tiles(w_ptr, N, w_stride, up_offset, BLOCK_N, PREFETCH_K, PREFETCH, GATED)
    pdl_wait(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns of this program
    m = tl.arange(0, ROWS)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    m_ok = m < M
    w_ptrs = w_ptr + n.to(tl.int64)[:, None] * w_stride + k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + m[:, None] * x_stride + k[None, :]  # [ROWS, BLOCK_K]
    up_ptrs = w_ptrs + up_offset  # GATED: the up rows, up_offset elements past the gate rows
    # REDUCE_EACH: sum over each K slice as it comes ([ROWS, BLOCK_N] accumulators, for many
    # rows); else keep every product lane apart and reduce once after the loop
    if REDUCE_EACH:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if NORM == 2:  # issued here, summed in the loop once the first weight loads are issued
        p = tl.arange(0, BLOCK_P)
        squares = tl.load(s_ptr + m[:, None] * s_stride + p[None, :],
                          mask=m_ok[:, None] & (p < parts)[None, :], other=0.0)  # [ROWS, BLOCK_P]
        rstd = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = m_ok[:, None]
            if EVEN_N:
                w = tl.load(w_ptrs)
                if GATED:
                    u = tl.load(up_ptrs)
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
                if GATED:
                    u = tl.load(up_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + k) < K
            x_mask = m_ok[:, None] & k_ok[None, :]
            w_mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            if GATED:
                u = tl.load(up_ptrs, mask=w_mask, other=0.0)
        if NORM == 1:  # one K step (K <= BLOCK_K), its weight loads already issued above:
            # x is rmsnorm(x + r) * g as kernels/rmsnorm.py computes it, from the whole row
            k_in = k < K
            row_in = m_ok[:, None] & k_in[None, :]
            xr = tl.load(x_ptrs, mask=row_in, other=0.0)  # [ROWS, BLOCK_K]
            r = tl.load(r_ptr + m[:, None] * r_stride + k[None, :], mask=row_in, other=0.0)
            g = tl.load(g_ptr + k, mask=k_in, other=0.0).to(tl.float32)
            summed = (xr.to(tl.float32) + r.to(tl.float32)).to(xr.dtype)  # the new residual
            # every program has the whole row; each writes its own share of x + r
            share = tl.cdiv(K, tl.num_programs(0))
            lo = tl.program_id(0) * share
            mine = row_in & (k[None, :] >= lo) & (k[None, :] < lo + share)
            tl.store(s_ptr + m[:, None] * s_stride + k[None, :], summed, mask=mine)
            sf = summed.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(sf * sf, axis=1) / K + eps)  # [ROWS]
            normed = (sf * rstd[:, None]).to(xr.dtype).to(tl.float32)
            x = (g[None, :] * normed).to(xr.dtype).to(tl.float32)[:, None, :]  # [ROWS, 1, BLOCK_K]
        elif NORM == 2:  # x already holds the residual; the same roundings as NORM 1
            if k0 == 0:  # (loop-invariant, but written plainly it is hoisted above the loop,
                # and so every program would wait for the sums before loading any weight)
                rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)  # [ROWS]
            xr = tl.load(x_ptrs, mask=x_mask, other=0.0)
            g = tl.load(g_ptr + k0 + k, mask=(k0 + k) < K, other=0.0).to(tl.float32)
            normed = (xr.to(tl.float32) * rstd[:, None]).to(xr.dtype).to(tl.float32)
            x = (g[None, :] * normed).to(xr.dtype).to(tl.float32)[:, None, :]
        elif NORM == 3:  # x * g now, the row's rstd after the loop
            xr = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + k0 + k, mask=(k0 + k) < K, other=0.0).to(tl.float32)
            x = (g[None, :] * xr)[:, None, :]
        else:
            x = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]  # [ROWS, 1, BLOCK_K]
        if REDUCE_EACH:
            acc += tl.sum(w.to(tl.float32)[None, :, :] * x, axis=2)
            if GATED:
                acc_up += tl.sum(u.to(tl.float32)[None, :, :] * x, axis=2)
        else:
            acc += w.to(tl.float32)[None, :, :] * x
            if GATED:
                acc_up += u.to(tl.float32)[None, :, :] * x
        if GATED:
            up_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if NORM == 3:  # issued before the products' reduction, which its latency then overlaps
        p = tl.arange(0, BLOCK_P)
        squares = tl.load(s_ptr + m[:, None] * s_stride + p[None, :],
                          mask=m_ok[:, None] & (p < parts)[None, :], other=0.0)  # [ROWS, BLOCK_P]
    y = acc if REDUCE_EACH else tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    if NORM == 3:
        rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]  # [ROWS, 1]
        y = y * rstd
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        up = acc_up if REDUCE_EACH else tl.sum(acc_up, axis=2)
        if NORM == 3:
            up = up * rstd
        if HAS_BIAS:
            up += tl.load(b_ptr + N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * up
    out_ok = m_ok[:, None] & n_ok[None, :]
    if ADD:  # the product rounded, then + r rounded: a residual add's roundings
        r = tl.load(r_ptr + m[:, None] * r_stride + n[None, :], mask=out_ok, other=0.0)
        y = (y.to(r.dtype).to(tl.float32) + r.to(tl.float32)).to(r.dtype).to(tl.float32)
        # masked columns and rows are 0 here (their weights and r load as 0)
        tl.store(s_ptr + m * s_stride + tl.program_id(0), tl.sum(y * y, axis=1), mask=m_ok)
    out_ptrs = out_ptr + m[:, None] * out_stride + n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_ok)


def default_config(m: int, n: int, k: int, gated: bool) -> tuple[int, int, int, bool]:
    """(BLOCK_N, BLOCK_K, num_warps, REDUCE_EACH) for an [m, k] x [n, k]^T product (n: output
    columns). Each K step a program loads 32 weight elements a thread (four 16-byte loads;
    the loop is not pipelined, so this is what a thread has in flight; 16 above 8 rows,
    where the products fill the registers: 255 a thread at 16 rows); a K of at most 2048
    is one step (its tail masked). Rows of weight per program shrink until there are at
    least 256 programs (two an SM on a 132-SM GPU). Up to 2 input rows keep every product
    lane apart until after the loop; more rows sum each step instead, keeping registers."""
    warps = 4
    rows = triton.next_power_of_2(max(m, 1))
    # one row, plain, K over 2048 (the 8B shape's qkv, o, down, LM head): 64 a thread, as
    # 4 x 2048 tiles; on an H100 the sweep's best for qkv, o and down, 4-13% faster than
    # 4 x 1024 (docs/PERF.md, nineteenth session)
    wide = rows == 1 and not gated and k > 2048
    tile = (64 if wide else 32 if rows <= 8 else 16) * 32 * warps  # weight elements a K step
    block_k = min(triton.next_power_of_2(k), 2048 if k <= 2048 or wide else 1024)
    block_n = max(tile // block_k, 1)
    if gated:  # gate and up rows: twice the loads
        block_n = max(block_n // 2, 1)
    while block_n > 1 and triton.cdiv(n, block_n) < 256:
        block_n //= 2
    return block_n, block_k, warps, m > 2


def _config(m: int, n: int, k: int, gated: bool, config=None) -> tuple[int, int, int, bool]:
    return (config or TUNED.get((triton.next_power_of_2(max(m, 1)), n, k, gated))
            or default_config(m, n, k, gated))


def _prefetch_plan(pdl: dict, w: torch.Tensor, k: int, block_k: int, warps: int,
                   block_n: int) -> tuple[int, int]:
    """(PREFETCH, PREFETCH_K) for a launch: (0, 0), none, unless EARLY_PREFETCH is on, the
    launch has PDL (only then can it start before the kernel ahead ends), K is whole K
    steps (the steps asked for lie within the row) and w's rows start 16-byte aligned (the
    bulk prefetch's unit); else chunks a row, about one a thread, each a whole number of
    128-byte L2 lines, over the row's first EARLY_PREFETCH K steps (at most all of them)."""
    steps = int(EARLY_PREFETCH)
    elem = w.element_size()
    if not (steps > 0 and pdl.get("PDL") and k % block_k == 0
            and w.data_ptr() % 16 == 0 and w.stride(0) * elem % 16 == 0):
        return 0, 0
    span = min(steps, k // block_k) * block_k
    lines = block_k * elem // 128  # a K step's lines (whole steps: the span's are a multiple)
    if lines == 0 or block_k * elem % 128:
        return 0, 0
    return max(1, min(32 * warps // block_n, lines)), span


def _parts(m: int, n: int, k: int) -> int:
    """How many programs a plain [m, k] x [n, k]^T product runs: gemv_add's sums per row."""
    return triton.cdiv(n, _config(m, n, k, False)[0])


def _launch(x: torch.Tensor, w: torch.Tensor, bias, out: torch.Tensor, gated: bool, config,
            norm=None, sums_norm=None, add=None) -> None:
    """norm: (residual, norm weight, eps, residual out) to multiply rmsnorm(x + residual) *
    weight instead of x (one K step: BLOCK_K is K's next power of two). sums_norm: (sums,
    norm weight, eps) to multiply rmsnorm(x) * weight, the row's scale from gemv_add's sums.
    add: (residual, sums out) to write x @ w.T + residual and its sums of squares."""
    m, k = x.shape
    n = out.shape[1]
    block_n, block_k, warps, reduce_each = _config(m, n, k, gated, config)
    up_offset = n * w.stride(0) if gated else 0
    r, g, s, eps, parts, mode = x, x, x, 0.0, 1, 0  # r, g, s never read unless a mode says
    if norm is not None:
        r, g, eps, s = norm
        block_k, mode = triton.next_power_of_2(k), 1
    elif sums_norm is not None:
        s, g, eps = sums_norm
        parts, mode = s.shape[1], 3 if SPLIT_SCALE_AFTER else 2
    elif add is not None:
        r, s = add
    pdl = pdl_args(x)
    chunks, span = _prefetch_plan(pdl, w, k, block_k, warps, block_n)
    cap = SPLIT_MAXNREG.get(gated) if mode >= 2 else None
    options = {"maxnreg": cap} if cap else {}
    with device_guard(x):
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, w, bias if bias is not None else w, out, m, n, k,
            x.stride(0), w.stride(0), out.stride(0), up_offset,
            r, g, s, r.stride(0), s.stride(0), parts, eps,
            ROWS=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
            EVEN_K=k % block_k == 0, EVEN_N=n % block_n == 0, HAS_BIAS=bias is not None,
            GATED=gated, REDUCE_EACH=reduce_each, NORM=mode, ADD=add is not None,
            BLOCK_P=triton.next_power_of_2(parts), num_warps=warps,
            PREFETCH=chunks, PREFETCH_K=span, **pdl, **options,
        )


def _out_cols(w: torch.Tensor, gated: bool) -> int:
    return w.shape[0] // 2 if gated else w.shape[0]


def _product(x, w, bias, gated: bool, config, **mode) -> torch.Tensor:
    out = x.new_empty((x.shape[0], _out_cols(w, gated)))
    if x.shape[0] and out.shape[1]:
        _launch(x, w, bias, out, gated, config, **mode)
    return out


@kernel_op("gemv")
def _gemv_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    return _product(x, w, bias, gated, None)


@_gemv_op.register_fake
def _(x, w, bias, gated):
    return x.new_empty((x.shape[0], _out_cols(w, gated)))


@kernel_op("gemv_add_rmsnorm")
def _gemv_norm_op(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  w: torch.Tensor, bias: torch.Tensor | None, gated: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    summed = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _product(x, w, bias, gated, None, norm=(residual, norm_weight, eps, summed)), summed


@_gemv_norm_op.register_fake
def _(x, residual, norm_weight, eps, w, bias, gated):
    return x.new_empty((x.shape[0], _out_cols(w, gated))), torch.empty_like(x)


def _sums_of(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # how many programs write sums depends on the launch config, chosen from the sizes, so
    # the sizes are taken as ints (under torch.compile with dynamic shapes: one graph a size)
    m, n, k = (int(size) for size in (x.shape[0], w.shape[0], x.shape[1]))
    return x.new_empty((m, _parts(m, n, k)), dtype=torch.float32)


@kernel_op("gemv_add")
def _gemv_add_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    sums = _sums_of(x, w)
    return _product(x, w, bias, False, None, add=(residual, sums)), sums


@_gemv_add_op.register_fake
def _(x, w, bias, residual):
    return x.new_empty((x.shape[0], w.shape[0])), _sums_of(x, w)


@kernel_op("gemv_rmsnorm_sums")
def _gemv_sums_op(x: torch.Tensor, sums: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  w: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    return _product(x, w, bias, gated, None, sums_norm=(sums, norm_weight, eps))


@_gemv_sums_op.register_fake
def _(x, sums, norm_weight, eps, w, bias, gated):
    return x.new_empty((x.shape[0], _out_cols(w, gated)))


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> None:
    name = "gemv"
    tensors = (x, w) if bias is None else (x, w, bias)
    check_launchable(name, *tensors)
    check_float(name, x=x, w=w)
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{name}: x must be [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[1]} features but w expects {w.shape[1]}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name}: at most {MAX_ROWS} rows (a GEMM's job above), got {x.shape[0]}")
    if x.dtype != w.dtype:
        raise ValueError(f"{name}: x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if x.shape[1] > 1 and (x.stride(1) != 1 or w.stride(1) != 1):
        raise ValueError(f"{name}: x and w must be contiguous along K (stride 1); call .contiguous()")
    if gated and w.shape[0] % 2:
        raise ValueError(f"{name}: gated needs an even number of weight rows (gate then up), got {w.shape[0]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0] or not bias.is_contiguous()
                             or bias.dtype != x.dtype):
        raise ValueError(f"{name}: bias must be a contiguous [{w.shape[0]}] of x's dtype, got "
                         f"{tuple(bias.shape)} {bias.dtype}")


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         gated: bool = False) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), w [N, K], bias [N] or None -> x @ w.T + bias [M, N] in x.dtype;
    gated: w holds gate rows then up rows, -> silu(gate) * up [M, N // 2]."""
    _check(x, w, bias, gated)
    return _gemv_op(x, w, bias, gated)


def fuses_norm(k: int) -> bool:
    """Whether gemv_add_rmsnorm takes rows of k features: one K step holds the whole row,
    which every program needs for its norm (SmolLM2's 576; not the 8B shape's 4096, where
    each of ~1500 programs would re-read 16 KiB of activations)."""
    return k <= NORM_MAX_K


def gemv_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     w: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add + RMSNorm feeding its next linear layer, in one launch:
    -> (gemv(h, w, bias, gated), x + residual) with h = fused_add_rmsnorm(x, residual,
    norm_weight, eps)[0], computed as kernels/rmsnorm.py does (x + residual rounded once,
    normalized from that, rounded, times the weight, rounded), never written out. Every
    program normalizes the whole row (K <= NORM_MAX_K, `fuses_norm`) and writes its share
    of x + residual."""
    name = "gemv_add_rmsnorm"
    _check(x, w, bias, gated)
    check_launchable(name, residual, norm_weight)
    k = x.shape[1]
    if not fuses_norm(k):
        raise ValueError(f"{name}: rows of at most {NORM_MAX_K} features (one K step), got {k}")
    _check_residual(name, residual, tuple(x.shape), x.dtype)
    _check_norm_weight(name, norm_weight, x)
    return _gemv_norm_op(x, residual, norm_weight, float(eps), w, bias, gated)


def _check_residual(name: str, residual: torch.Tensor, shape: tuple[int, int], dtype) -> None:
    if (tuple(residual.shape) != shape or residual.dtype != dtype
            or (shape[1] > 1 and residual.stride(1) != 1)):
        raise ValueError(f"{name}: residual must be {shape} {dtype} with stride 1 along its last "
                         f"dim, got {tuple(residual.shape)} {residual.dtype}")


def _check_norm_weight(name: str, norm_weight: torch.Tensor, x: torch.Tensor) -> None:
    k = x.shape[1]
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous() or norm_weight.dtype != x.dtype:
        raise ValueError(f"{name}: norm_weight must be a contiguous [{k}] of x's dtype, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")


def splits_norm(k: int, m: int = 1) -> bool:
    """Whether a residual add + RMSNorm over m rows of k features goes into the GEMVs around
    it as gemv_add then gemv_rmsnorm_sums: rows too wide for gemv_add_rmsnorm's one K step
    (the 8B shape's 4096), at most SPLIT_MAX_ROWS of them, while SPLIT_NORM is on."""
    return SPLIT_NORM and not fuses_norm(k) and m <= SPLIT_MAX_ROWS


def gemv_add(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor,
             bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer and the residual add after it, in one launch: -> (h, sums) with h =
    residual + gemv(x, w, bias), rounded as the two steps round (the product to x's dtype,
    then the sum), and sums [M, P] fp32 the sums of squares of h's columns that each of the
    launch's P programs wrote, whose rows add up to (h.float() ** 2).sum(-1): what
    gemv_rmsnorm_sums needs to normalize h without another pass over it."""
    name = "gemv_add"
    _check(x, w, bias, False)
    check_launchable(name, residual)
    _check_residual(name, residual, (x.shape[0], w.shape[0]), x.dtype)
    return _gemv_add_op(x, w, bias, residual)


def gemv_rmsnorm_sums(x: torch.Tensor, sums: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      w: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False
                      ) -> torch.Tensor:
    """gemv(rmsnorm(x, norm_weight, eps), w, bias, gated) in one launch, the norm's scale
    from the sums of squares that gemv_add left with x (any [M, P] fp32 whose rows add up
    to x's), the roundings as kernels/rmsnorm.py's (its sum in another order); with
    SPLIT_SCALE_AFTER, without the norm's roundings of its output."""
    name = "gemv_rmsnorm_sums"
    _check(x, w, bias, gated)
    check_launchable(name, sums, norm_weight)
    _check_norm_weight(name, norm_weight, x)
    if (sums.dim() != 2 or sums.shape[0] != x.shape[0] or sums.dtype != torch.float32
            or not sums.is_contiguous() or sums.shape[1] < 1):
        raise ValueError(f"{name}: sums must be a contiguous fp32 [{x.shape[0]}, P >= 1] (gemv_add's), "
                         f"got {tuple(sums.shape)} {sums.dtype}")
    return _gemv_sums_op(x, sums, norm_weight, float(eps), w, bias, gated)


def gemv_add_rmsnorm_reference(x, residual, norm_weight, eps, w, bias=None, gated=False):
    """The two steps in torch: the rmsnorm reference on x + residual, then gemv_reference."""
    from kernels.rmsnorm import rmsnorm_reference

    summed = (x.float() + residual.float()).to(x.dtype)
    return gemv_reference(rmsnorm_reference(summed, norm_weight, eps), w, bias, gated), summed


def gemv_add_reference(x, w, residual, bias=None):
    """gemv_reference, then the residual add as a separate rounding step."""
    return (gemv_reference(x, w, bias).float() + residual.float()).to(x.dtype)


def gemv_rmsnorm_sums_reference(x, norm_weight, eps, w, bias=None, gated=False):
    """The rmsnorm reference on x, then gemv_reference (no sums: it takes the whole row)."""
    from kernels.rmsnorm import rmsnorm_reference

    return gemv_reference(rmsnorm_reference(x, norm_weight, eps), w, bias, gated)


def gemv_with_config(x, w, bias=None, gated=False, config=None) -> torch.Tensor:
    """gemv with an explicit (BLOCK_N, BLOCK_K, num_warps, REDUCE_EACH), for tuning sweeps."""
    _check(x, w, bias, gated)
    return _product(x, w, bias, gated, config)


def gemv_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                   gated: bool = False) -> torch.Tensor:
    """The same in torch, in fp32, rounded once to x.dtype."""
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y.to(x.dtype)
