"""Neox (rotate-half) rotary embedding for q [T, H, D] and k [T, Hkv, D], in place or not.

cos/sin are the [max_position, D] tables of engine/layers.py RotaryEmbedding
(cos = cat(freqs, freqs).cos()). Both halves of each table row are read, so any table of
that shape works. Math in fp32, one rounding to the input dtype, as the torch reference.
Positions are not range-checked on the device (that would need a sync): a position
>= max_position reads out of bounds.
"""

import torch

from kernels._triton import (
    check_float,
    check_index,
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
def _load_cos_sin(
    cos_ptr, sin_ptr, pos, cos_row_stride, sin_row_stride, half, BLOCK_HALF: tl.constexpr
):
    """Row `pos` of the cos / sin tables as fp32 halves cos1, cos2, sin1, sin2 [BLOCK_HALF]."""
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < half
    cos_row = cos_ptr + pos * cos_row_stride
    sin_row = sin_ptr + pos * sin_row_stride
    cos1 = tl.load(cos_row + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + half + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + half + d, mask=dmask, other=0.0).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def _rotate_half(x1, x2, cos1, cos2, sin1, sin2):
    """fp32 row halves [BLOCK_H, BLOCK_HALF] -> rotated halves: x * cos + rotate_half(x) * sin.

    kernels/kv_store.py rotates k through this too: one expression, one set of numerics.
    """
    out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    return out1, out2


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    src_head_stride,
    dst_head_stride,
    num_heads,
    half,
    cos1,
    cos2,
    sin1,
    sin2,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate num_heads rows of one token; cos*/sin* are [BLOCK_HALF] fp32 halves."""
    d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < num_heads)[:, None] & (d < half)[None, :]  # [BLOCK_H, BLOCK_HALF]
        src = src_ptr + h[:, None] * src_head_stride + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        out1, out2 = _rotate_half(x1, x2, cos1, cos2, sin1, sin2)
        dst = dst_ptr + h[:, None] * dst_head_stride + d[None, :]
        tl.store(dst, out1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, out2.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    q_tok_stride,
    q_head_stride,
    k_tok_stride,
    k_head_stride,
    qo_tok_stride,
    qo_head_stride,
    ko_tok_stride,
    ko_head_stride,
    cos_row_stride,
    sin_row_stride,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos1, cos2, sin1, sin2 = _load_cos_sin(
        cos_ptr, sin_ptr, pos, cos_row_stride, sin_row_stride, half, BLOCK_HALF
    )  # [BLOCK_HALF] each
    _rotate_heads(
        q_ptr + tok * q_tok_stride,
        q_out_ptr + tok * qo_tok_stride,
        q_head_stride,
        qo_head_stride,
        num_q_heads,
        half,
        cos1,
        cos2,
        sin1,
        sin2,
        BLOCK_H,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr + tok * k_tok_stride,
        k_out_ptr + tok * ko_tok_stride,
        k_head_stride,
        ko_head_stride,
        num_k_heads,
        half,
        cos1,
        cos2,
        sin1,
        sin2,
        BLOCK_H,
        BLOCK_HALF,
    )


def _launch(positions, q, k, cos, sin, q_out, k_out) -> None:
    t, h, d = q.shape
    if t == 0:
        return
    block_half = triton.next_power_of_2(d // 2)
    block_h = max(1, min(triton.next_power_of_2(max(h, k.shape[1])), 4096 // block_half))
    with device_guard(q):
        _rotary_kernel[(t,)](
            q,
            k,
            q_out,
            k_out,
            positions,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos.stride(0),
            sin.stride(0),
            h,
            k.shape[1],
            d // 2,
            BLOCK_H=block_h,
            BLOCK_HALF=block_half,
            num_warps=4,
            **pdl_args(q),
        )


@kernel_op("rotary_embedding")
def _rotary_op(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(positions, q, k, cos, sin, q_out, k_out)
    return q_out, k_out


@_rotary_op.register_fake
def _(positions, q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


@kernel_op("rotary_embedding_", ("q", "k"))
def _rotary_inplace_op(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    # each program reads both halves of a row before it writes them: safe in place
    _launch(positions, q, k, cos, sin, q, k)


def check_rotary_args(positions, q, k, cos, sin, name: str = "apply_rotary") -> None:
    """The checks apply_rotary makes (kernels/kv_store.py's fused op shares them)."""
    check_launchable(name, positions, q, k, cos, sin)
    check_float(name, q=q, k=k, cos=cos, sin=sin)
    check_index(name, positions=positions)
    check_last_dim_contiguous(name, q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"{name}: q, k must be [T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"{name}: k {tuple(k.shape)} must share T and D with q {tuple(q.shape)}")
    if d % 2 != 0:
        raise ValueError(f"{name}: head_dim must be even for rotate-half, got {d}")
    if positions.shape != (t,):
        raise ValueError(f"{name}: positions must be [T={t}], got {tuple(positions.shape)}")
    for arg, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != d:
            raise ValueError(f"{name}: {arg} must be [max_position, {d}], got {tuple(table.shape)}")


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T]; q [T, H, D], k [T, Hkv, D]; cos, sin [P, D] -> rotated (q, k).

    inplace=True overwrites q and k and returns them.
    """
    check_rotary_args(positions, q, k, cos, sin)
    if inplace:
        _rotary_inplace_op(positions, q, k, cos, sin)
        return q, k
    return _rotary_op(positions, q, k, cos, sin)


def apply_rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    c = cos[positions].float().unsqueeze(1)  # [T, 1, D]
    s = sin[positions].float().unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        xf = x.float()
        rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * c + rot * s).to(x.dtype)

    return rotate(q), rotate(k)
