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

rotary_store_kv is the same store with kernels/rotary.py's rotary embedding folded in, one
launch instead of two: it rotates q in place and stores rotated k (k itself is left as it
was) and v. Rotated k is computed in fp32 with rotary.py's expression, rounded once to k's
dtype and stored or quantized from that rounded value, so the cache holds exactly what
apply_rotary followed by store_kv would write. q is rotated for every token, padding
(slot < 0) included. Positions are not range-checked on the device, as in rotary.py.
"""

import torch

from kernels._triton import (
    check_float,
    check_index,
    check_last_dim_contiguous,
    check_launchable,
    device_guard,
    gpu_capability,
    kernel_op,
    pdl_args,
    pdl_wait,
    tl,
    triton,
)
from kernels.rotary import (
    _load_cos_sin,
    _rotate_half,
    _rotate_heads,
    apply_rotary_reference,
    check_rotary_args,
)

# fp32(1 / 127), the factor torch's CUDA `t / 127.0` multiplies by (see the module docstring)
INV_127 = (torch.tensor(1.0) / torch.tensor(127.0)).item()


def scales_by_reciprocal(device: torch.device) -> bool:
    """Quantize as torch does on this device, so that scales match engine.kv_cache's bit for
    bit: CUDA computes t / 127.0 as t * fp32(1/127), the CPU divides. CUDA tensors (under
    the interpreter too) and the GPU targets of compile-only runs multiply."""
    return device.type == "cuda" or gpu_capability(device) is not None


@triton.jit
def _round_half_even(y):
    """torch.round semantics without libdevice (the interpreter has none): ties go to even."""
    f = tl.floor(y)
    diff = y - f  # exact for |y| < 2**23
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (diff > 0.5) | ((diff == 0.5) & f_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _int8_scale(amax, inv_qmax, SCALE_BY_RECIPROCAL: tl.constexpr):
    """[BLOCK_H] max |x| of each row -> its int8 scale, as torch computes it on this device."""
    amax = tl.maximum(amax, 1e-8)
    if SCALE_BY_RECIPROCAL:
        scale = amax * inv_qmax
    else:
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    return scale


@triton.jit
def _store_int8(x, scale, dst, mask):
    """x [BLOCK_H, N] fp32, scale [BLOCK_H] -> int8 round_half_even(x / scale) at dst."""
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    q = tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0)
    tl.store(dst, q.to(tl.int8), mask=mask)


@triton.jit
def _store_rows(
    x,
    dst,
    scale_dst,
    mask,
    row_mask,
    inv_qmax,
    QUANTIZE: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
):
    """Store a [BLOCK_H, BLOCK_D] fp32 tile of one token (zeros where masked off); quantize
    per head row if asked."""
    if QUANTIZE:
        scale = _int8_scale(tl.max(tl.abs(x), axis=1), inv_qmax, SCALE_BY_RECIPROCAL)
        _store_int8(x, scale, dst, mask)
        tl.store(scale_dst, scale, mask=row_mask)
    else:
        tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_row_halves(
    x1,
    x2,
    dst,
    scale_dst,
    mask,
    row_mask,
    half,
    inv_qmax,
    QUANTIZE: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
):
    """_store_rows for a tile held as its halves [BLOCK_H, BLOCK_HALF]: x1 to dst, x2 to
    dst + half (one scale per row, over both)."""
    if QUANTIZE:
        amax = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
        scale = _int8_scale(amax, inv_qmax, SCALE_BY_RECIPROCAL)
        _store_int8(x1, scale, dst, mask)
        _store_int8(x2, scale, dst + half, mask)
        tl.store(scale_dst, scale, mask=row_mask)
    else:
        tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + half, x2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    data_ptr,
    scales_ptr,
    slots_ptr,
    q_ptr,  # q_ptr, pos_ptr, cos_ptr, sin_ptr: read only when ROTARY
    pos_ptr,
    cos_ptr,
    sin_ptr,
    k_tok_stride,
    k_head_stride,
    v_tok_stride,
    v_head_stride,
    q_tok_stride,
    q_head_stride,
    cos_row_stride,
    sin_row_stride,
    d_kv_stride,
    d_page_stride,
    d_slot_stride,
    d_head_stride,
    s_kv_stride,
    s_page_stride,
    s_slot_stride,
    s_head_stride,
    num_heads,
    num_q_heads,
    q_heads_per_program,
    head_dim,
    inv_qmax,
    PAGE_SIZE: tl.constexpr,
    QUANTIZE: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
    ROTARY: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program: BLOCK_H kv heads of one token; when ROTARY, also its share of the
    token's q heads (q_heads_per_program of them, BLOCK_QH at a time)."""
    pdl_wait(PDL)
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

    k_row = k_ptr + tok * k_tok_stride + h[:, None] * k_head_stride  # [BLOCK_H, 1]
    v_row = v_ptr + tok * v_tok_stride + h[:, None] * v_head_stride
    dst_row = data_ptr + page * d_page_stride + offset * d_slot_stride + h[:, None] * d_head_stride
    scale_dst = scales_ptr + page * s_page_stride + offset * s_slot_stride + h * s_head_stride
    if ROTARY:
        half = head_dim // 2
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cos1, cos2, sin1, sin2 = _load_cos_sin(
            cos_ptr, sin_ptr, pos, cos_row_stride, sin_row_stride, half, BLOCK_D // 2
        )  # [BLOCK_D // 2] each
        # q in place, padding rows too. _rotate_heads hands both halves of an element pair
        # to the thread that writes them back: no thread overwrites what another still reads
        q0 = tl.program_id(1) * q_heads_per_program
        n_q = tl.minimum(tl.maximum(num_q_heads - q0, 0), q_heads_per_program)
        q_row = q_ptr + tok * q_tok_stride + q0 * q_head_stride
        _rotate_heads(
            q_row,
            q_row,
            q_head_stride,
            q_head_stride,
            n_q,
            half,
            cos1,
            cos2,
            sin1,
            sin2,
            BLOCK_QH,
            BLOCK_D // 2,
        )
        # k: rotated by halves like apply_rotary, rounded once to k's dtype, then stored
        i = tl.arange(0, BLOCK_D // 2)
        half_mask = row_mask[:, None] & (i < half)[None, :]  # [BLOCK_H, BLOCK_D // 2]
        x1 = tl.load(k_row + i[None, :], mask=half_mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_row + half + i[None, :], mask=half_mask, other=0.0).to(tl.float32)
        k1, k2 = _rotate_half(x1, x2, cos1, cos2, sin1, sin2)
        k1 = k1.to(k_ptr.dtype.element_ty).to(tl.float32)
        k2 = k2.to(k_ptr.dtype.element_ty).to(tl.float32)
        _store_row_halves(
            k1,
            k2,
            dst_row + i[None, :],
            scale_dst,
            half_mask,
            row_mask,
            half,
            inv_qmax,
            QUANTIZE,
            SCALE_BY_RECIPROCAL,
        )
    else:
        k = tl.load(k_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
        _store_rows(
            k,
            dst_row + d[None, :],
            scale_dst,
            mask,
            row_mask,
            inv_qmax,
            QUANTIZE,
            SCALE_BY_RECIPROCAL,
        )
    v = tl.load(v_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    v_dst, v_scale_dst = dst_row + d_kv_stride + d[None, :], scale_dst + s_kv_stride
    _store_rows(v, v_dst, v_scale_dst, mask, row_mask, inv_qmax, QUANTIZE, SCALE_BY_RECIPROCAL)


def _launch(k, v, data_layer, scales_layer, slots, rotary=None) -> None:
    """rotary: (positions, q, cos, sin) to rotate q in place and k on its way to the cache.

    The grid is store_kv's, (T, kv-head blocks); q's heads are shared out over its second
    axis, so the fused launch has as many programs as the store alone.
    """
    t, hkv, d = k.shape
    if t == 0:
        return
    if rotary is None:
        positions, q, cos, sin = slots, k, k, k  # never read
        num_q_heads = 0
    else:
        positions, q, cos, sin = rotary
        num_q_heads = q.shape[1]
    quantize = scales_layer is not None
    sc = scales_layer if quantize else data_layer  # never read when not quantizing
    s_strides = scales_layer.stride() if quantize else (0, 0, 0, 0)
    block_d = triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(hkv), 4096 // block_d))
    head_blocks = triton.cdiv(hkv, block_h)
    q_per_program = triton.cdiv(num_q_heads, head_blocks)
    # as kernels/rotary.py tiles q: up to 4096 elements of each half at a time
    block_qh = max(1, min(triton.next_power_of_2(q_per_program), 4096 // max(1, block_d // 2)))
    with device_guard(k):
        _store_kv_kernel[(t, head_blocks)](
            k,
            v,
            data_layer,
            sc,
            slots,
            q,
            positions,
            cos,
            sin,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            q.stride(0),
            q.stride(1),
            cos.stride(0),
            sin.stride(0),
            *data_layer.stride()[:4],
            *s_strides,
            hkv,
            num_q_heads,
            q_per_program,
            d,
            INV_127,
            PAGE_SIZE=data_layer.shape[2],
            QUANTIZE=quantize,
            SCALE_BY_RECIPROCAL=scales_by_reciprocal(k.device),
            ROTARY=rotary is not None,
            BLOCK_H=block_h,
            BLOCK_QH=block_qh,
            BLOCK_D=block_d,
            num_warps=4,
            **pdl_args(k),
        )


@kernel_op("store_kv", ("data_layer", "scales_layer"))
def _store_kv_op(
    k: torch.Tensor,
    v: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    _launch(k, v, data_layer, scales_layer, slots)


@kernel_op("rotary_store_kv", ("q", "data_layer", "scales_layer"))
def _rotary_store_kv_op(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    _launch(k, v, data_layer, scales_layer, slots, rotary=(positions, q, cos, sin))


def _check(k, v, data_layer, scales_layer, slots, name: str = "store_kv") -> None:
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


def rotary_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    """apply_rotary then store_kv in one launch: q rotated in place, rotated k into the cache.

    positions [T]; q [T, H, D], k, v [T, Hkv, D]; cos, sin [max_position, D] (as apply_rotary);
    data_layer, scales_layer, slots as store_kv. q is rotated for every token, slot < 0
    included; k and v are left untouched (rotated k goes only to the cache). The cache then
    holds exactly what store_kv would write from apply_rotary's k.
    """
    name = "rotary_store_kv"
    check_rotary_args(positions, q, k, cos, sin, name=name)
    _check(k, v, data_layer, scales_layer, slots, name=name)
    _rotary_store_kv_op(positions, q, k, v, cos, sin, data_layer, scales_layer, slots)


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


def rotary_store_kv_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    q_rot, k_rot = apply_rotary_reference(positions, q, k, cos, sin)
    q.copy_(q_rot)
    store_kv_reference(k_rot, v, data_layer, scales_layer, slots)
