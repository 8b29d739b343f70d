"""SiLU-and-mul for gated MLPs: x [..., 2I] -> silu(x[..., :I]) * x[..., I:].

Computed in fp32 and rounded once to x.dtype (torch rounds twice for 16-bit inputs: after
silu and after the product, so bf16 results may differ from the reference by one ulp).
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


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    n_cols,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * x_row_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _out_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] // 2)


@kernel_op("silu_and_mul")
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(_out_shape(x))
    half = out.shape[-1]
    x2 = x.reshape(-1, 2 * half)  # [T, 2I]
    out2 = out.view(-1, half)  # [T, I]
    if x2.shape[0] == 0 or half == 0:
        return out
    block = min(triton.next_power_of_2(half), 1024)
    with device_guard(x):
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(half, block))](
            x2, out2, x2.stride(0), out2.stride(0), half, BLOCK=block, num_warps=4,
            **pdl_args(x),
        )
    return out


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty(_out_shape(x))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate then up) -> [..., I] in x.dtype."""
    name = "silu_and_mul"
    check_launchable(name, x)
    check_float(name, x=x)
    check_last_dim_contiguous(name, x=x)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"{name}: x's last dim must be even (gate and up), got {tuple(x.shape)}")
    return _silu_and_mul_op(x)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]
