"""Write new K/V into one layer of the paged cache, quantizing to int8 on the way for int8 pools.

Layout (engine/kv_cache.py): data_layer [2, num_pages, page_size, Hkv, D] (2 = K, V), and
for int8 scales_layer [2, num_pages, page_size, Hkv] float32. int8 is symmetric per token
per head: scale = max(max|x|, 1e-8) / 127, q = round_half_even(x / scale) in [-127, 127].
The int8 values and scales are bit-identical to engine.kv_cache.quantize_int8 run on the
same device: x / scale is a correctly rounded division (div_rn; Triton's plain `/` is an
approximate one on GPU), rounding is half-to-even like torch.round, and max / 127 follows
torch, which divides on CPU but multiplies by fp32(1/127) on CUDA (its kernel turns a
division by a scalar into a multiplication by the reciprocal; the two differ by an ulp).

slots [T] hold flat slots (page * page_size + offset); a slot < 0 skips its token, which
lets CUDA-graph replays pad the batch. Slots past the pool are not checked on the device.
"""

import torch

from kernels._triton import (
    check_float,
    check_index,
    check_last_dim_contiguous,
    check_launchable,
    device_guard,
    tl,
    triton,
)

# fp32(1 / 127), the factor torch's CUDA `t / 127.0` multiplies by (see the module docstring)
INV_127 = (torch.tensor(1.0) / torch.tensor(127.0)).item()


@triton.jit
def _round_half_even(y):
    """torch.round semantics without libdevice (the interpreter has none): ties go to even."""
    f = tl.floor(y)
    diff = y - f  # exact for |y| < 2**23
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (diff > 0.5) | ((diff == 0.5) & f_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _store_rows(
    src,
    dst,
    scale_dst,
    mask,
    row_mask,
    inv_qmax,
    QUANTIZE: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
):
    """Store a [BLOCK_H, BLOCK_D] tile of one token; quantize per head row if asked."""
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if QUANTIZE:
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8)  # [BLOCK_H]
        if SCALE_BY_RECIPROCAL:
            scale = amax * inv_qmax
        else:
            scale = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        q = tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0)
        tl.store(dst, q.to(tl.int8), mask=mask)
        tl.store(scale_dst, scale, mask=row_mask)
    else:
        tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    data_ptr,
    scales_ptr,
    slots_ptr,
    k_tok_stride,
    k_head_stride,
    v_tok_stride,
    v_head_stride,
    d_kv_stride,
    d_page_stride,
    d_slot_stride,
    d_head_stride,
    s_kv_stride,
    s_page_stride,
    s_slot_stride,
    s_head_stride,
    num_heads,
    head_dim,
    inv_qmax,
    PAGE_SIZE: tl.constexpr,
    QUANTIZE: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # broadcast the slot before comparing: the interpreter mis-types scalar-bool & vector-bool
    slots_h = tl.zeros([BLOCK_H], dtype=tl.int64) + slot
    row_mask = (h < num_heads) & (slots_h >= 0)  # [BLOCK_H]
    mask = row_mask[:, None] & (d < head_dim)[None, :]  # [BLOCK_H, BLOCK_D]

    dst = data_ptr + page * d_page_stride + offset * d_slot_stride
    dst = dst + h[:, None] * d_head_stride + d[None, :]
    scale_dst = scales_ptr + page * s_page_stride + offset * s_slot_stride + h * s_head_stride
    k_src = k_ptr + tok * k_tok_stride + h[:, None] * k_head_stride + d[None, :]
    v_src = v_ptr + tok * v_tok_stride + h[:, None] * v_head_stride + d[None, :]
    _store_rows(k_src, dst, scale_dst, mask, row_mask, inv_qmax, QUANTIZE, SCALE_BY_RECIPROCAL)
    v_dst, v_scale_dst = dst + d_kv_stride, scale_dst + s_kv_stride
    _store_rows(v_src, v_dst, v_scale_dst, mask, row_mask, inv_qmax, QUANTIZE, SCALE_BY_RECIPROCAL)


@torch.library.custom_op("miniinfer::store_kv", mutates_args=("data_layer", "scales_layer"))
def _store_kv_op(
    k: torch.Tensor,
    v: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    t, hkv, d = k.shape
    if t == 0:
        return
    quantize = scales_layer is not None
    sc = scales_layer if quantize else data_layer  # never read when not quantizing
    s_strides = scales_layer.stride() if quantize else (0, 0, 0, 0)
    block_d = triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(hkv), 4096 // block_d))
    with device_guard(k):
        _store_kv_kernel[(t, triton.cdiv(hkv, block_h))](
            k,
            v,
            data_layer,
            sc,
            slots,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            *data_layer.stride()[:4],
            *s_strides,
            hkv,
            d,
            INV_127,
            PAGE_SIZE=data_layer.shape[2],
            QUANTIZE=quantize,
            SCALE_BY_RECIPROCAL=k.device.type == "cuda",
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            num_warps=4,
        )


def _check(k, v, data_layer, scales_layer, slots) -> None:
    name = "store_kv"
    tensors = [k, v, data_layer, slots] + ([] if scales_layer is None else [scales_layer])
    check_launchable(name, *tensors)
    check_float(name, k=k, v=v)
    check_index(name, slots=slots)
    check_last_dim_contiguous(name, k=k, v=v, data_layer=data_layer)
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"{name}: k, v must both be [T, Hkv, D], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    t, hkv, d = k.shape
    if data_layer.dim() != 5 or data_layer.shape[0] != 2 or data_layer.shape[3:] != (hkv, d):
        raise ValueError(
            f"{name}: data_layer must be [2, num_pages, page_size, {hkv}, {d}], "
            f"got {tuple(data_layer.shape)}"
        )
    if slots.shape != (t,):
        raise ValueError(f"{name}: slots must be [T={t}], got {tuple(slots.shape)}")
    if data_layer.dtype == torch.int8:
        if scales_layer is None:
            raise ValueError(
                f"{name}: an int8 cache needs scales_layer [2, num_pages, page_size, Hkv]"
            )
        if scales_layer.shape != data_layer.shape[:4] or scales_layer.dtype != torch.float32:
            raise ValueError(
                f"{name}: scales_layer must be float32 {tuple(data_layer.shape[:4])}, "
                f"got {scales_layer.dtype} {tuple(scales_layer.shape)}"
            )
    else:
        check_float(name, data_layer=data_layer)
        if scales_layer is not None:
            raise ValueError(
                f"{name}: scales_layer is only for int8 caches, data is {data_layer.dtype}"
            )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] -> data_layer[:, slot // S, slot % S] (and scales_layer), in place."""
    _check(k, v, data_layer, scales_layer, slots)
    _store_kv_op(k, v, data_layer, scales_layer, slots)


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float -> ([..., D] int8, [...] float32), as engine.kv_cache.quantize_int8."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def store_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    keep = slots >= 0
    k, v, slots = k[keep], v[keep], slots[keep].long()
    pages, offsets = slots // data_layer.shape[2], slots % data_layer.shape[2]
    for i, x in enumerate((k, v)):
        if scales_layer is not None:
            x, scale = quantize_int8_reference(x)
            scales_layer[i, pages, offsets] = scale
        data_layer[i, pages, offsets] = x.to(data_layer.dtype)
