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

MAX_ROWS = 16  # above this a GEMM (cuBLAS) is the right tool
# (ROWS, output columns, K, gated) -> (BLOCK_N, BLOCK_K, num_warps, REDUCE_EACH), taken over
# default_config where present (ROWS = next_power_of_2(M)). Empty unless a tuning run fills
# it: bench/gemv.py --sweep --engine captures decode graphs with its sweep's best configs.
TUNED: dict[tuple[int, int, int, bool], tuple[int, int, int, bool]] = {}


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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    REDUCE_EACH: tl.constexpr,
    PDL: tl.constexpr,
):
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
    y = acc if REDUCE_EACH else tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        up = acc_up if REDUCE_EACH else tl.sum(acc_up, axis=2)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * up
    out_ptrs = out_ptr + m[:, None] * out_stride + n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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
    tile = (32 if rows <= 8 else 16) * 32 * warps  # weight elements a program loads a K step
    block_k = min(triton.next_power_of_2(k), 2048 if k <= 2048 else 1024)
    block_n = max(tile // block_k, 1)
    if gated:  # gate and up rows: twice the loads
        block_n = max(block_n // 2, 1)
    while block_n > 1 and triton.cdiv(n, block_n) < 256:
        block_n //= 2
    return block_n, block_k, warps, m > 2


def _launch(x: torch.Tensor, w: torch.Tensor, bias, out: torch.Tensor, gated: bool, config) -> None:
    m, k = x.shape
    n = out.shape[1]
    rows = triton.next_power_of_2(m)
    block_n, block_k, warps, reduce_each = (config or TUNED.get((rows, n, k, gated))
                                            or default_config(m, n, k, gated))
    up_offset = n * w.stride(0) if gated else 0
    with device_guard(x):
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, w, bias if bias is not None else w, out, m, n, k,
            x.stride(0), w.stride(0), out.stride(0), up_offset,
            ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k,
            EVEN_K=k % block_k == 0, EVEN_N=n % block_n == 0, HAS_BIAS=bias is not None,
            GATED=gated, REDUCE_EACH=reduce_each, num_warps=warps, **pdl_args(x),
        )


def _out_cols(w: torch.Tensor, gated: bool) -> int:
    return w.shape[0] // 2 if gated else w.shape[0]


def _product(x, w, bias, gated: bool, config) -> torch.Tensor:
    out = x.new_empty((x.shape[0], _out_cols(w, gated)))
    if x.shape[0] and out.shape[1]:
        _launch(x, w, bias, out, gated, config)
    return out


@kernel_op("gemv")
def _gemv_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    return _product(x, w, bias, gated, None)


@_gemv_op.register_fake
def _(x, w, bias, gated):
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
