"""RMSNorm and fused residual-add + RMSNorm, one program per row.

Matches engine/layers.py RMSNorm exactly in its rounding points:
    normed = weight * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype)
with the product taken in fp32 and rounded once to x.dtype. The fused variant first rounds
x + residual to x.dtype (that rounded sum is both the new residual and the norm's input,
as in the unfused torch code). Output dtype is always x.dtype.
"""

import torch

from kernels._triton import (
    check_float,
    check_last_dim_contiguous,
    check_launchable,
    device_guard,
    kernel_op,
    pdl_args,
    pdl_wait,
    tl,
    triton,
)

MAX_HIDDEN = 65536  # one row must fit one program's registers


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_row_stride,
    res_row_stride,
    out_row_stride,
    res_out_row_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)  # [BLOCK_N]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * res_out_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(mean_sq + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * normed.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def _launch(x2, res2, weight, out2, res_out2, eps: float) -> None:
    rows, n = x2.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(n)
    has_res = res2 is not None
    with device_guard(x2):
        _rmsnorm_kernel[(rows,)](
            x2,
            res2 if has_res else x2,
            weight,
            out2,
            res_out2 if has_res else out2,
            x2.stride(0),
            res2.stride(0) if has_res else 0,
            out2.stride(0),
            res_out2.stride(0) if has_res else 0,
            n,
            eps,
            HAS_RESIDUAL=has_res,
            BLOCK_N=block,
            num_warps=_num_warps(block),
            **pdl_args(x2),
        )


@kernel_op("rmsnorm")
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x.reshape(-1, n), None, weight, out.view(-1, n), None, eps)
    return out


@_rmsnorm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@kernel_op("fused_add_rmsnorm")
def _fused_add_rmsnorm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_res = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(
        x.reshape(-1, n), residual.reshape(-1, n), weight, out.view(-1, n), new_res.view(-1, n), eps
    )
    return out, new_res


@_fused_add_rmsnorm_op.register_fake
def _(x, residual, weight, eps):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, residual=None) -> None:
    tensors = {"x": x, "weight": weight} | ({} if residual is None else {"residual": residual})
    check_launchable(name, *tensors.values())
    check_float(name, **tensors)
    check_last_dim_contiguous(name, **tensors)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name}: weight must be [hidden] matching x's last dim, got x {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {x.shape[-1]} exceeds the maximum {MAX_HIDDEN}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{name}: residual must match x in shape and dtype, got {tuple(residual.shape)} "
            f"{residual.dtype} vs {tuple(x.shape)} {x.dtype}"
        )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., N], weight [N] -> [..., N] in x.dtype."""
    _check("rmsnorm", x, weight)
    return _rmsnorm_op(x, weight, float(eps))


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] -> (rmsnorm(x + residual), x + residual), both in x.dtype."""
    _check("fused_add_rmsnorm", x, weight, residual)
    return _fused_add_rmsnorm_op(x, residual, weight, float(eps))


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf.to(x.dtype).float()).to(x.dtype)


def fused_add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rmsnorm_reference(new_residual, weight, eps), new_residual
