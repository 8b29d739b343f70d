"""Decode attention over the paged KV cache: one query token per sequence, split-K.

Flash-decoding: the context of each sequence is cut into partitions of `partition_size`
tokens; one program per (sequence, kv head, partition) runs an online softmax over its
keys for all the query heads of that GQA group at once (each K/V row is read once per
group), and writes its partial (max, sum, unnormalized output). A second kernel merges
the partials of each (sequence, head).

The number of partitions comes from block_tables.shape[1] (the largest context the table
can describe), never from ctx_lens' values: no host sync, and the launch is the same on
every CUDA-graph replay. Partitions past a sequence's length exit at once, and the merge
reads only the partitions its context reaches.

int8 caches are dequantized in the kernel: scores = (q . k_int8) * k_scale and the
value scale is folded into the probabilities. Accumulation is fp32. A sequence with
ctx_len == 0 (CUDA-graph padding) gets a zero output (engine.attention gives NaN there).
"""

import math

import torch

from kernels._triton import (
    _env_flag,
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
from kernels.kv_store import (
    INV_127,
    _check,
    _rotary_store_kv_op,
    _store_row_halves,
    scales_by_reciprocal,
)
from kernels.prefetch import ahead_plan, prefetch_lanes
from kernels.rotary import _load_cos_sin, _rotate_half, check_rotary_args

LOG2E = 1.4426950408889634


@triton.jit
def _i8_to_f16(x):
    """int8 -> fp16, exact, without the conversion unit (I2F issues 16 a clock an SM on
    sm_90; with Triton's own int8 -> bf16 sequence it held int8 decode attention near 65%
    of the copy bandwidth). Four bytes a register: each byte + 128 goes under the exponent
    of fp16 1024 (whose mantissa step is 1), then one fp16x2 subtract of 1152 per pair."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 u, c;
        xor.b32 u, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, u, 0x64646464, 0x4140;
        prmt.b32 $1, u, 0x64646464, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _i8x4_to_f16(words):
    """int32 words of four int8 (lowest address first) -> the four as fp16 tensors, by
    _i8_to_f16's steps."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 u, c, a, b;
        xor.b32 u, $4, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 a, u, 0x64646464, 0x4140;
        prmt.b32 b, u, 0x64646464, 0x4342;
        sub.f16x2 a, a, c;
        sub.f16x2 b, b, c;
        mov.b32 {$0, $1}, a;
        mov.b32 {$2, $3}, b;
        }""",
        constraints="=h,=h,=h,=h,r", args=[words],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _k_operand(k, dtype: tl.constexpr, FAST_I8: tl.constexpr):
    """A loaded K tile as a dot operand of `dtype` (fp16 when FAST_I8)."""
    if FAST_I8:
        return _i8_to_f16(k)
    else:
        return k.to(dtype)


@triton.jit
def _v_load(ptrs, rows, n_mask, mask, FAST_I8: tl.constexpr):
    """A V tile: the elements at ptrs [BLOCK_N, C] where mask, or with FAST_I8 (every
    column) the C columns from the row starts `rows` [BLOCK_N] where n_mask [BLOCK_N], as
    C / 4 int32 words a row (_v_operand converts either)."""
    if FAST_I8:
        w = tl.arange(0, ptrs.shape[1] // 4)
        return tl.load(rows.to(tl.pointer_type(tl.int32))[:, None] + w[None, :],
                       mask=n_mask[:, None], other=0)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _v_operand(v, dtype: tl.constexpr, FAST_I8: tl.constexpr):
    """A loaded V tile (_v_load) as a dot operand of `dtype` (fp16 when FAST_I8).

    FAST_I8 converts the words before the tile changes layout for the dot, so the shuffle
    moves 16-bit values (ldmatrix.trans) rather than bytes: a byte-loaded int8 V tile is
    gathered one byte at a time from shared memory, as the dot pairs values of consecutive
    tokens. On sm_90 (triton 3.6, compiled offline) the int8 one-warp tile in halves fell
    from 1409 instructions to 1043 with both conversions, 1088 with the weighted running
    max (whole tiles: 1484 -> 1141)."""
    if FAST_I8:
        b0, b1, b2, b3 = _i8x4_to_f16(v)
        x = tl.join(tl.join(b0, b2), tl.join(b1, b3))  # [BLOCK_N, C / 4, 2, 2]: b0 b1 b2 b3
        return tl.reshape(x, [v.shape[0], 4 * v.shape[1]])
    else:
        return v.to(dtype)


@triton.jit
def _tile_rows(n, end, kvh, table, d_page_stride, d_slot_stride, d_head_stride,
               PAGE_SIZE: tl.constexpr):
    """Keys n [BLOCK_N] -> (n < end, their pages, their rows' offsets in a layer)."""
    # masked on prefill's whole tiles too: dropping the key mask there made prefill 4.5%
    # slower (H200)
    n_mask = n < end
    page = tl.load(table + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    row = page * d_page_stride + (n % PAGE_SIZE) * d_slot_stride + kvh * d_head_stride
    return n_mask, page, row


@triton.jit
def _kv_scales(page, n, n_mask, kvh, scales_ptr, s_kv_stride, s_page_stride, s_slot_stride,
               s_head_stride, PAGE_SIZE: tl.constexpr):
    """int8 pages: the keys' and values' scales [BLOCK_N]."""
    srow = page * s_page_stride + (n % PAGE_SIZE) * s_slot_stride + kvh * s_head_stride
    k_scale = tl.load(scales_ptr + srow, mask=n_mask, other=0.0)
    v_scale = tl.load(scales_ptr + s_kv_stride + srow, mask=n_mask, other=0.0)
    return k_scale, v_scale


@triton.jit
def _softmax_step(s, m_i, l_i, qk_scale, PRESCALED: tl.constexpr):
    """Masked scores s [M, BLOCK_N] (-inf where hidden) -> (m_new, l_i, p, alpha).

    m_new is finite: every row has seen a key by this tile (decode tiles start below
    `end`; prefill rows all see key 0 in their first tile). PRESCALED scores are already in
    log2 units (int8 tiles fold qk_scale into the key scales); the others take qk_scale
    after the max (a positive scale commutes with it) and inside the exponent's
    multiply-add: one multiply a score fewer than scaling the tile first (prefill 337.8
    vs 334.0 TFLOP/s on an H200), outputs equal within bf16 rounding."""
    if PRESCALED:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def _exponent(x):
    """floor(log2(x)) of positive normal fp32 values from their exponent bits (-127 for 0)."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _weighted_scores(s, v_scale):
    """FAST_I8's running max runs over these: s + floor(log2(v_scale)) [M, BLOCK_N], the
    exponent clamped at -64 (zero scales: masked keys, all-zero rows)."""
    return s + tl.maximum(_exponent(v_scale), -64).to(tl.float32)[None, :]


@triton.jit
def _weighted_softmax_step(s, m_i, l_i, v_scale):
    """_softmax_step for FAST_I8 tiles (s in log2 units): -> (m_new, l_i, p * v_scale,
    alpha), the probabilities already times the value scales, as P @ V takes them in fp16.

    The running max is over s + floor(log2(v_scale)) rather than s, so every p * v_scale
    is below 2 (fp16 cannot overflow) and the largest term of a row is at least 1: fp16
    loses only terms below 2^-24 of that one for value scales from 2^-64 up (the int8
    store's smallest is about 2^-34; a fixed scale-up factor would underflow where every
    value scale is tiny). l counts exp2(s - m) against the same m; the merge kernel is
    unchanged. The exponent is clamped at -64 (zero scales: masked keys, all-zero rows),
    so exp2(s - m) <= 2^64."""
    m_new = tl.maximum(m_i, tl.max(_weighted_scores(s, v_scale), axis=1))
    e = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(e, axis=1), e * v_scale[None, :], alpha


@triton.jit
def _tile_probabilities(s, m_i, l_i, qk_scale, v_scale, QUANTIZED: tl.constexpr,
                        FAST_I8: tl.constexpr):
    """A tile's masked scores -> (m_new, l_i, p, alpha), p already times the value scales
    for int8 pages (_softmax_step, or _weighted_softmax_step for FAST_I8)."""
    if FAST_I8:
        m_new, l_i, p, alpha = _weighted_softmax_step(s, m_i, l_i, v_scale)
    else:
        m_new, l_i, p, alpha = _softmax_step(s, m_i, l_i, qk_scale, QUANTIZED)
        if QUANTIZED:
            p = p * v_scale[None, :]
    return m_new, l_i, p, alpha


@triton.jit
def _lazy_probabilities(s, m_i, l_i, acc_lo, acc_hi, qk_scale, v_scale, QUANTIZED: tl.constexpr,
                        FAST_I8: tl.constexpr):
    """_tile_probabilities with a lazy running max (LAZY): the max, and with it the
    accumulators and sums, moves only when some row's tile passes it by more than 2^8, so
    most tiles skip the rescale (FA4's trick); probabilities may then reach 2^8 (FAST_I8:
    p * v_scale < 2^9, still far inside fp16). -> (m_i, l_i, p, acc_lo, acc_hi); p times
    the value scales for int8 pages. Scores as _tile_probabilities takes them."""
    if FAST_I8:  # the max over the weighted scores, as _weighted_softmax_step
        x = _weighted_scores(s, v_scale)
    elif QUANTIZED:  # already in log2 units
        x = s
    else:
        s = s * qk_scale
        x = s
    m_tile = tl.max(x, axis=1)
    if tl.max(m_tile - m_i, axis=0) > 8.0:  # the first tile always (m_i = -inf)
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.exp2(m_i - m_new)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    e = tl.exp2(s - m_i[:, None])
    l_i = l_i + tl.sum(e, axis=1)
    if QUANTIZED:
        e = e * v_scale[None, :]
    return m_i, l_i, e, acc_lo, acc_hi


@triton.jit
def _attend_tile(
    q, q_pos, n, end, kvh, d, d_mask, data_ptr, scales_ptr, table, m_i, l_i, acc, qk_scale,
    d_kv_stride, d_page_stride, d_slot_stride, d_head_stride,
    s_kv_stride, s_page_stride, s_slot_stride, s_head_stride,
    PAGE_SIZE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK: tl.constexpr,
    FAST_I8: tl.constexpr = False,
):
    """One online-softmax step of the query rows q [M, D] over the keys n [BLOCK_N] < end,
    read from their pages through `table`; int8 pages dequantized (key scale on the
    scores, value scale folded into the probabilities). -> (m_i, l_i, acc) updated.

    MASK: "end" masks keys past `end` (decode); "causal" also keys past each row's
    position q_pos [M] (prefill tiles that reach the diagonal); "none" masks nothing
    (prefill tiles every row sees whole)."""
    n_mask, page, row = _tile_rows(n, end, kvh, table, d_page_stride, d_slot_stride,
                                   d_head_stride, PAGE_SIZE)
    v_scale = 1.0  # 16-bit pages: unused
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(data_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = _v_load(data_ptr + d_kv_stride + row[:, None] + d[None, :], data_ptr + d_kv_stride + row,
                n_mask, kv_mask, FAST_I8)
    s = tl.dot(q, tl.trans(_k_operand(k, q.dtype, FAST_I8)), input_precision=DOT_PRECISION)
    if QUANTIZED:
        k_scale, v_scale = _kv_scales(page, n, n_mask, kvh, scales_ptr, s_kv_stride,
                                      s_page_stride, s_slot_stride, s_head_stride, PAGE_SIZE)
        s = s * (k_scale * qk_scale)[None, :]  # in log2 units from here
    if MASK == "causal":
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    elif MASK == "end":
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new, l_i, p, alpha = _tile_probabilities(s, m_i, l_i, qk_scale, v_scale, QUANTIZED, FAST_I8)
    pv = tl.dot(p.to(q.dtype), _v_operand(v, q.dtype, FAST_I8), input_precision=DOT_PRECISION)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attend_tile_halves(
    q_lo, q_hi, r_lo, r_hi, q_row, n, end, kvh, dh, data_ptr, scales_ptr, table, m_i, l_i, acc_lo, acc_hi,
    qk_scale, d_kv_stride, d_page_stride, d_slot_stride, d_head_stride,
    s_kv_stride, s_page_stride, s_slot_stride, s_head_stride,
    PAGE_SIZE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HALF: tl.constexpr,
    PV_DTYPE: tl.constexpr,
    FAST_I8: tl.constexpr = False,
    I8_QK: tl.constexpr = False,
    LAZY: tl.constexpr = False,
):
    """_attend_tile's decode step ("end" mask) with the head dim cut in two halves of
    HALF = len(dh) columns (q = [q_lo | q_hi], acc likewise; no column mask, so
    head_dim == 2 * HALF). Each half of a K or V tile is loaded, converted and used on
    its own. For the int8 one-warp tile on three stages (sm_90, triton 3.6, compiled
    offline) that was 1409 instructions a tile against 1484 whole on two stages (both
    255 registers a thread), before FAST_I8."""
    n_mask, page, row = _tile_rows(n, end, kvh, table, d_page_stride, d_slot_stride,
                                   d_head_stride, PAGE_SIZE)
    base = data_ptr + row[:, None] + dh[None, :]  # [BLOCK_N, HALF], keys' first half
    v_scale = 1.0  # 16-bit pages: unused
    k_lo = tl.load(base, mask=n_mask[:, None], other=0.0)
    k_hi = tl.load(base + HALF, mask=n_mask[:, None], other=0.0)
    if I8_QK:  # int8 dots on the keys as loaded; _i8_query's two parts of the query
        i32: tl.constexpr = tl.int32
        s = tl.dot(q_hi, tl.trans(k_hi), tl.dot(q_lo, tl.trans(k_lo), out_dtype=i32), out_dtype=i32)
        t = tl.dot(r_hi, tl.trans(k_hi), tl.dot(r_lo, tl.trans(k_lo), out_dtype=i32), out_dtype=i32)
        s = (s * 254 + t).to(tl.float32) * q_row[:, None]
    else:
        s = tl.dot(q_lo, tl.trans(_k_operand(k_lo, q_lo.dtype, FAST_I8)),
                   input_precision=DOT_PRECISION)
        s = tl.dot(q_hi, tl.trans(_k_operand(k_hi, q_hi.dtype, FAST_I8)), s,
                   input_precision=DOT_PRECISION)
    if QUANTIZED:
        k_scale, v_scale = _kv_scales(page, n, n_mask, kvh, scales_ptr, s_kv_stride,
                                      s_page_stride, s_slot_stride, s_head_stride, PAGE_SIZE)
        s = s * (k_scale * qk_scale)[None, :]
    s = tl.where(n_mask[None, :], s, float("-inf"))
    if LAZY:
        m_new, l_i, p, acc_lo, acc_hi = _lazy_probabilities(
            s, m_i, l_i, acc_lo, acc_hi, qk_scale, v_scale, QUANTIZED, FAST_I8)
    else:
        m_new, l_i, p, alpha = _tile_probabilities(s, m_i, l_i, qk_scale, v_scale, QUANTIZED,
                                                   FAST_I8)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
    p = p.to(PV_DTYPE)
    v_rows = data_ptr + d_kv_stride + row
    v_lo = _v_load(base + d_kv_stride, v_rows, n_mask, n_mask[:, None], FAST_I8)
    acc_lo = tl.dot(p, _v_operand(v_lo, PV_DTYPE, FAST_I8), acc_lo, input_precision=DOT_PRECISION)
    v_hi = _v_load(base + d_kv_stride + HALF, v_rows + HALF, n_mask, n_mask[:, None], FAST_I8)
    acc_hi = tl.dot(p, _v_operand(v_hi, PV_DTYPE, FAST_I8), acc_hi, input_precision=DOT_PRECISION)
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _fp16_query(q, big):
    """FAST_I8: a query tile whose largest magnitude is `big` as fp16 times 2^-e, where
    2^e <= big < 2^(e+1), so at most 2 (11 significant bits, against bf16's 8).
    -> (the tile, 2^e: the factor the scores take back). e is clamped to +-126 (both
    factors stay normal fp32): that covers every bf16 or fp16 query but all-zero ones."""
    e = tl.minimum(tl.maximum(_exponent(big), -126), 126)
    down = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return (q.to(tl.float32) * down).to(tl.float16), ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _i8_query(q, big):
    """I8_QK: query rows q [G, C] whose largest magnitudes are big [G] as two int8 tiles,
    main and res, with q = (main + res / 254) * big / 127 to within big / 64516 an element
    (about 16 bits of the row's largest value; the 16-bit paths are exact for bf16 and fp16
    queries, so this is the one that rounds). Per row, so one large head does not cost the
    others of its group their accuracy. Scores then come from int8 dots on the int8 keys
    as they lie in the pages, with no conversion: 254 * (main . k) + (res . k) in int32
    (at most 127 * 255 * 128 * D: exact for head dims up to 256), times the returned row
    factors big / (127 * 254) [G]."""
    x = q.to(tl.float32) * (127.0 / tl.maximum(big, 1e-30))[:, None]
    main = tl.floor(x + 0.5)
    res = tl.floor((x - main) * 254.0 + 0.5)
    return main.to(tl.int8), res.to(tl.int8), big * (1.0 / (127.0 * 254.0))


@triton.jit
def _store_new_kv(b, kvh, dh, cos1, cos2, sin1, sin2, k_ptr, v_ptr, slots_ptr, data_ptr,
                  scales_ptr, k_b_stride, k_h_stride, v_b_stride, v_h_stride, d_kv_stride,
                  d_page_stride, d_slot_stride, d_head_stride, s_kv_stride, s_page_stride,
                  s_slot_stride, s_head_stride, inv_qmax, PAGE_SIZE: tl.constexpr,
                  HALF: tl.constexpr, QUANTIZE: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr):
    """Sequence b's new token for kv head kvh into its slot, as rotary_store_kv stores it:
    k rotated in fp32 by _rotate_half, rounded once to k's dtype, then stored or quantized
    (kernels/kv_store.py's helpers); v as it is. Tiles are [1, HALF] rows. A slot < 0
    stores nothing."""
    slot = tl.load(slots_ptr + b).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    row_mask = (tl.zeros([1], tl.int64) + slot) >= 0  # [1]
    mask = row_mask[:, None] & (dh < HALF)[None, :]  # [1, HALF]
    k_row = k_ptr + b * k_b_stride + kvh * k_h_stride + dh[None, :]
    v_row = v_ptr + b * v_b_stride + kvh * v_h_stride + dh[None, :]
    dst = data_ptr + page * d_page_stride + offset * d_slot_stride + kvh * d_head_stride + dh[None, :]
    scale_dst = (scales_ptr + page * s_page_stride + offset * s_slot_stride + kvh * s_head_stride
                 + tl.zeros([1], tl.int64))
    x1 = tl.load(k_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_row + HALF, mask=mask, other=0.0).to(tl.float32)
    k1, k2 = _rotate_half(x1, x2, cos1, cos2, sin1, sin2)
    k1 = k1.to(k_ptr.dtype.element_ty).to(tl.float32)
    k2 = k2.to(k_ptr.dtype.element_ty).to(tl.float32)
    _store_row_halves(k1, k2, dst, scale_dst, mask, row_mask, HALF, inv_qmax, QUANTIZE,
                      SCALE_BY_RECIPROCAL)
    v1 = tl.load(v_row, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(v_row + HALF, mask=mask, other=0.0).to(tl.float32)
    _store_row_halves(v1, v2, dst + d_kv_stride, scale_dst + s_kv_stride, mask, row_mask, HALF,
                      inv_qmax, QUANTIZE, SCALE_BY_RECIPROCAL)


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    data_ptr,
    scales_ptr,
    block_tables_ptr,
    ctx_lens_ptr,
    mid_out_ptr,
    mid_max_ptr,
    mid_sum_ptr,
    q_b_stride,
    q_h_stride,
    d_kv_stride,
    d_page_stride,
    d_slot_stride,
    d_head_stride,
    s_kv_stride,
    s_page_stride,
    s_slot_stride,
    s_head_stride,
    bt_b_stride,
    num_heads,
    head_dim,
    qk_scale,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_D: tl.constexpr,
    FAST_I8: tl.constexpr,
    I8_QK: tl.constexpr,
    LAZY: tl.constexpr,
    PV_DTYPE: tl.constexpr,
    PDL: tl.constexpr,
    # this step's own K/V, stored by the kernel (ROTARY: see _store_new_kv); read only then
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    slots_ptr,
    k_b_stride,
    k_h_stride,
    v_b_stride,
    v_h_stride,
    cos_row_stride,
    sin_row_stride,
    inv_qmax,
    SCALE_BY_RECIPROCAL: tl.constexpr,
    ROTARY: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    num_parts = tl.num_programs(2)
    ctx = tl.load(ctx_lens_ptr + b).to(tl.int32)
    start = part * PARTITION_SIZE
    if start >= ctx:  # past this sequence's context: the reduce never reads this partition
        return
    end = tl.minimum(start + PARTITION_SIZE, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g  # [BLOCK_G]
    g_mask = g < GROUP
    d_mask = d < head_dim
    table = block_tables_ptr + b * bt_b_stride
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    mid = (b * num_heads + heads) * num_parts + part  # [BLOCK_G] row of [B, H, NP]
    q_ptrs = q_ptr + b * q_b_stride + heads[:, None] * q_h_stride
    out_ptrs = mid_out_ptr + mid[:, None] * head_dim
    if SPLIT_D:  # head_dim == BLOCK_D, in two halves
        HALF: tl.constexpr = BLOCK_D // 2
        dh = tl.arange(0, HALF)
        q_lo = tl.load(q_ptrs + dh[None, :], mask=g_mask[:, None], other=0.0)
        q_hi = tl.load(q_ptrs + HALF + dh[None, :], mask=g_mask[:, None], other=0.0)
        if ROTARY:
            pos = tl.load(pos_ptr + b).to(tl.int64)
            cos1, cos2, sin1, sin2 = _load_cos_sin(cos_ptr, sin_ptr, pos, cos_row_stride,
                                                   sin_row_stride, HALF, HALF)
            r_lo, r_hi = _rotate_half(q_lo.to(tl.float32), q_hi.to(tl.float32), cos1, cos2,
                                      sin1, sin2)
            q_lo = r_lo.to(q_ptr.dtype.element_ty)
            q_hi = r_hi.to(q_ptr.dtype.element_ty)
            if part == (ctx - 1) // PARTITION_SIZE:  # the partition holding this step's token
                _store_new_kv(
                    b, kvh, dh, cos1, cos2, sin1, sin2, k_ptr, v_ptr, slots_ptr, data_ptr,
                    scales_ptr, k_b_stride, k_h_stride, v_b_stride, v_h_stride, d_kv_stride,
                    d_page_stride, d_slot_stride, d_head_stride, s_kv_stride, s_page_stride,
                    s_slot_stride, s_head_stride, inv_qmax, PAGE_SIZE, HALF, QUANTIZED,
                    SCALE_BY_RECIPROCAL,
                )
                tl.debug_barrier()  # the row is in the cache before any thread reads its tile
        tile_scale = qk_scale
        r_lo = q_lo  # I8_QK's second parts and row factors
        r_hi = q_hi
        q_row = tl.full([BLOCK_G], 1.0, tl.float32)
        if I8_QK:
            big = tl.maximum(tl.max(tl.abs(q_lo.to(tl.float32)), axis=1),
                             tl.max(tl.abs(q_hi.to(tl.float32)), axis=1))
            q_lo, r_lo, q_row = _i8_query(q_lo, big)
            q_hi, r_hi, q_row = _i8_query(q_hi, big)
        elif FAST_I8:
            big = tl.maximum(tl.max(tl.abs(q_lo.to(tl.float32))),
                             tl.max(tl.abs(q_hi.to(tl.float32))))
            q_lo, up = _fp16_query(q_lo, big)
            q_hi, up = _fp16_query(q_hi, big)
            tile_scale = qk_scale * up
        acc_lo = tl.zeros([BLOCK_G, HALF], tl.float32)
        acc_hi = tl.zeros([BLOCK_G, HALF], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc_lo, acc_hi = _attend_tile_halves(
                q_lo, q_hi, r_lo, r_hi, q_row, n0 + tl.arange(0, BLOCK_N), end, kvh, dh, data_ptr, scales_ptr,
                table, m_i, l_i, acc_lo, acc_hi, tile_scale, d_kv_stride, d_page_stride,
                d_slot_stride, d_head_stride, s_kv_stride, s_page_stride, s_slot_stride,
                s_head_stride, PAGE_SIZE, QUANTIZED, DOT_PRECISION, HALF, PV_DTYPE, FAST_I8,
                I8_QK, LAZY,
            )
        tl.store(out_ptrs + dh[None, :], acc_lo, mask=g_mask[:, None])
        tl.store(out_ptrs + HALF + dh[None, :], acc_hi, mask=g_mask[:, None])
    else:
        q = tl.load(q_ptrs + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        tile_scale = qk_scale
        if FAST_I8:
            q, up = _fp16_query(q, tl.max(tl.abs(q.to(tl.float32))))
            tile_scale = qk_scale * up
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, 0, n0 + tl.arange(0, BLOCK_N), end, kvh, d, d_mask, data_ptr, scales_ptr,
                table, m_i, l_i, acc, tile_scale, d_kv_stride, d_page_stride, d_slot_stride,
                d_head_stride, s_kv_stride, s_page_stride, s_slot_stride, s_head_stride,
                PAGE_SIZE, QUANTIZED, DOT_PRECISION, "end", FAST_I8,
            )
        tl.store(out_ptrs + d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(mid_max_ptr + mid, m_i, mask=g_mask)
    tl.store(mid_sum_ptr + mid, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    mid_out_ptr,
    mid_max_ptr,
    mid_sum_ptr,
    ctx_lens_ptr,
    out_ptr,
    out_b_stride,
    out_h_stride,
    num_heads,
    num_parts,
    head_dim,
    ahead_base,
    ahead_bytes,
    ahead_chunk,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    AHEAD: tl.constexpr,
    PDL: tl.constexpr,
):
    # AHEAD: lanes a program asks L2 for its share of the next kernels' bytes with, before
    # the wait (kernels.prefetch.ahead: the o weight, fetched while the partitions run)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if AHEAD:
        first = (tl.program_id(0) * tl.num_programs(1) + h) * AHEAD
        prefetch_lanes(ahead_base, ahead_bytes, ahead_chunk, first + tl.arange(0, AHEAD))
    pdl_wait(PDL)
    base = (b * num_heads + h) * num_parts
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    # only the partitions this sequence's context reaches: the table (and so num_parts) is
    # sized for the longest context a graph serves, often many times the real one
    ctx = tl.load(ctx_lens_ptr + b).to(tl.int32)
    num_parts_used = tl.minimum((ctx + PARTITION_SIZE - 1) // PARTITION_SIZE, num_parts)

    m_run = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, num_parts_used, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = tl.load(mid_max_ptr + base + p, mask=p < num_parts_used, other=float("-inf"))
        m_run = tl.maximum(m_run, m)
    # all partitions empty (ctx_len == 0): a finite stand-in keeps exp2(-inf - m_max) at 0
    m_max = tl.max(m_run, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)

    denom = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, num_parts_used, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < num_parts_used
        m = tl.load(mid_max_ptr + base + p, mask=p_mask, other=float("-inf"))
        l_p = tl.load(mid_sum_ptr + base + p, mask=p_mask, other=0.0)
        w = tl.exp2(m - m_max)  # [BLOCK_P]; empty partitions carry m = -inf: weight 0
        o = tl.load(
            mid_out_ptr + (base + p)[:, None] * head_dim + d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_P, BLOCK_D]
        denom += l_p * w
        acc += tl.sum(o * w[:, None], axis=0)
    total = tl.sum(denom, axis=0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    out_ptrs = out_ptr + b * out_b_stride + h * out_h_stride + d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# Launch override {"block_n", "num_warps", "num_stages", "maxnreg", "split_d", "fast_i8",
# "i8_qk", "lazy"}: set by bench/decode_attn_tune.py, which sweeps them on a GPU, and by
# tests that pick a path. None: the rules in _launch. split_d is still only taken where
# halves_allowed says so, fast_i8 only where fast_i8_allowed does, i8_qk and lazy as
# _launch says (absent: off).
TUNING: dict | None = None

# rotary_store_decode_attention in one launch where the tiles run in halves (a decode step's
# rotary + K/V store kernel folded into the partition kernel). On an H100 (same-run A/B,
# graphs, batch 1 x ctx 512) the step took 4.4% less time on SmolLM2's shape and 1.2% less
# on the 8B shape (docs/PERF.md, fifteenth session). MINIINFER_FUSE_ROTARY_STORE=0 turns it
# off (the two launches), as may code that sets this.
FUSE_ROTARY_STORE = _env_flag("MINIINFER_FUSE_ROTARY_STORE", default=True)


def halves_allowed(head_dim: int) -> bool:
    """The head dim can run in two halves: a power of two of 32 or more (halves of 16+
    columns for the dots, and no column mask)."""
    return head_dim >= 32 and head_dim == triton.next_power_of_2(head_dim)


def words_aligned(data_layer: torch.Tensor) -> bool:
    """Every row of an int8 layer starts on a 4-byte boundary: FAST_I8 reads V rows as
    int32 words. True for a layer of a contiguous cache; a caller's view may not be."""
    return data_layer.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in data_layer.stride()[:4])


def fast_i8_allowed(device: torch.device, quantized: bool, q_dtype: torch.dtype,
                    head_dim: int) -> bool:
    """int8 pages under 16-bit queries on a GPU (not the interpreter, which runs no inline
    assembly) may take the FAST_I8 tiles: fp16 dots, K and V converted by _i8_to_f16 and
    _i8x4_to_f16, V read in whole words (so a power-of-two head dim: no column mask).
    fp32 queries keep exact fp32 dots over the dequantized pages."""
    return (quantized and gpu_capability(device) is not None
            and q_dtype in (torch.float16, torch.bfloat16)
            and head_dim >= 16 and head_dim == triton.next_power_of_2(head_dim))


def i8_qk_allowed(quantized: bool, q_dtype: torch.dtype, head_dim: int) -> bool:
    """int8 pages under 16-bit queries may take their scores from int8 dots (I8_QK); the
    int32 sums stay exact up to head dim 256, and a half of 32+ columns is what Triton's
    int8 dot needs on a GPU (K >= 32), so head dims 64 to 256. fp32 queries keep exact
    fp32 dots."""
    return quantized and q_dtype in (torch.float16, torch.bfloat16) and 64 <= head_dim <= 256


def _drop_unsafe_lazy(cfg: dict, quantized: bool, q_dtype: torch.dtype) -> None:
    """LAZY lets probabilities reach 2^8: int8 pages under fp16 queries without FAST_I8
    (whose weighted max bounds p * v_scale) would take p * v_scale into fp16 and overflow
    for value scales above 256, so they keep the eager max."""
    if quantized and q_dtype == torch.float16 and not cfg["fast_i8"]:
        cfg["lazy"] = False


def _launch(device: torch.device, partition_size: int, quantized: bool, head_dim: int,
            q_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile size and launch options: big tiles on GPU, 16-token tiles in the interpreter.

    split_d: run the tile's head dim in two halves (_attend_tile_halves), only where
    halves_allowed(head_dim). The interpreter takes it wherever it may, so that the CPU
    tests cover both paths. fast_i8: FAST_I8 tiles, only where fast_i8_allowed. i8_qk
    (scores from int8 dots, _i8_query) and lazy (_lazy_probabilities): tiles in halves
    only, i8_qk where i8_qk_allowed, lazy not where _drop_unsafe_lazy says; off unless
    TUNING sets them (on an H100 I8_QK, then with one query scale a tile, was 0.3-1%
    faster at b32 x ctx 8192 and slower at small shapes; not measured on an H200).

    FAST_I8 numerics: K and V are exact in fp16; the queries (scaled by a power of two to
    at most 2, _fp16_query) and the probabilities times the value scales (below 2 by the
    running max, _weighted_softmax_step) are rounded to fp16: 11 significant bits, against
    bf16's 8, and neither can overflow."""
    cfg = dict(block_n=16, num_warps=1, num_stages=None, maxnreg=None, split_d=True,
               fast_i8=False, i8_qk=False, lazy=False)
    if TUNING is not None:
        cfg = {"num_stages": None, "maxnreg": None, "split_d": False, **TUNING}
    elif gpu_capability(device) is not None:
        # 16-bit pages in halves, H200 (graph-timed, same-run A/B): 12% faster at b32 x
        # ctx 1024 on SmolLM2's shape (D64), 1.6% at b8 on the 8B shape (D128), within 1%
        # at b32 x ctx 8192, 0.2 us (4%) slower at b1
        cfg.update(block_n=math.gcd(partition_size, 64), num_warps=4, split_d=not quantized)
        if quantized and partition_size >= 128:
            # int8 tiles are bound by the loop's per-tile work (the int8 -> bf16 conversion,
            # the layout shuffles for the dots), not by bandwidth. One warp per program needs
            # no barrier between warps, and many programs then share an SM. On an H200, timed
            # in a CUDA graph (bench/decode_attn_tune.py): b32 x ctx 8192, partition 512,
            # 0.220 ms against 0.280 for 128-token tiles on 4 warps; b8 x ctx 1024,
            # partition 128, 13.9 us against 17.9. With 64-token partitions (few sequences)
            # one warp per program was slower: 9.6 us against 7.0 at b1 x ctx 512.
            # Whole tiles: two pipeline stages, 0.206 ms at b32 x ctx 8192 against 0.222 on
            # Triton's three. Halves (fewer instructions a tile) on three stages, at D128
            # only (the one head dim where they were faster): 0.2055 against 0.2089 ms at
            # b32 x ctx 8192 and 11.6 against 12.7 us at b8 x ctx 1024; at D64 they were
            # 3-6% slower; other head dims were not measured and stay whole.
            # FAST_I8 on the same tiles (1088 instructions a tile in halves against 1409),
            # on an H100 (graph-timed, same run): 0.2208 against 0.2257 ms at b32 x ctx 8192
            # (84% of copy bandwidth, against 82%); on an H200 0.184 against 0.193 ms (71%
            # against 68%) and the whole int8 step 10.98 against 11.35 ms. So on for 512-token
            # partitions in halves (the engine's longest; longer ones, which only a caller
            # may ask for, too).
            # Where it was slower it stays off: 128-token partitions (12.0 against 11.8 us,
            # b8 x ctx 1024), D64 whole tiles (11.2 against 10.5 us, b32 x ctx 1024), the
            # four-warp 64-token partitions (7.3 against 6.5 us, b1 x ctx 512).
            halves = head_dim == 128
            cfg.update(block_n=math.gcd(partition_size, 32), num_warps=1,
                       num_stages=3 if halves else 2, split_d=halves,
                       fast_i8=halves and partition_size >= 512)
    cfg["split_d"] = bool(cfg["split_d"]) and halves_allowed(head_dim)
    allowed = fast_i8_allowed(device, quantized, q_dtype, head_dim)
    cfg["fast_i8"] = bool(cfg.get("fast_i8", False)) and allowed
    cfg["i8_qk"] = (bool(cfg.get("i8_qk", False)) and cfg["split_d"]
                    and i8_qk_allowed(quantized, q_dtype, head_dim))
    cfg["lazy"] = bool(cfg.get("lazy", False)) and cfg["split_d"]
    _drop_unsafe_lazy(cfg, quantized, q_dtype)
    return cfg


def launch_config(q: torch.Tensor, data_layer: torch.Tensor, partition_size: int,
                  quantized: bool) -> dict:
    """_launch's options for these tensors: what the kernel runs. fast_i8 also needs
    word-aligned rows; a layer whose rows are not (a caller's view) takes the byte loads."""
    cfg = _launch(q.device, partition_size, quantized, q.shape[-1], q.dtype)
    cfg["fast_i8"] = cfg["fast_i8"] and words_aligned(data_layer)
    _drop_unsafe_lazy(cfg, quantized, q.dtype)
    return cfg


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _run(q, data_layer, scales_layer, block_tables, ctx_lens, sm_scale, partition_size,
         new_kv=None) -> torch.Tensor:
    """new_kv: (positions, k, v, cos, sin, slots) to rotate q and store this step's K/V in
    the partition kernel (only where fuses_rotary_store says so)."""
    b, h, d = q.shape
    hkv, page_size = data_layer.shape[3], data_layer.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if b == 0:
        return out
    num_parts = max(1, triton.cdiv(block_tables.shape[1] * page_size, partition_size))
    mid_out = torch.empty((b, h, num_parts, d), dtype=torch.float32, device=q.device)
    mid_max = torch.empty((b, h, num_parts), dtype=torch.float32, device=q.device)
    mid_sum = torch.empty_like(mid_max)
    quantized = scales_layer is not None
    s_strides = scales_layer.stride() if quantized else (0, 0, 0, 0)
    group = h // hkv
    cfg = launch_config(q, data_layer, partition_size, quantized)
    options = {k: cfg[k] for k in ("num_stages", "maxnreg") if cfg[k]}
    block_d = max(16, triton.next_power_of_2(d))
    if new_kv is None:
        pos, k, v, cos, sin, slots = ctx_lens, q, q, q, q, ctx_lens  # never read
    else:
        pos, k, v, cos, sin, slots = new_kv
        if not cfg["split_d"]:
            raise ValueError("decode_attention: the fused K/V store runs only on tiles in halves")
    with device_guard(q):
        _decode_partition_kernel[(b, hkv, num_parts)](
            q,
            data_layer,
            scales_layer if quantized else data_layer,
            block_tables,
            ctx_lens,
            mid_out,
            mid_max,
            mid_sum,
            q.stride(0),
            q.stride(1),
            *data_layer.stride()[:4],
            *s_strides,
            block_tables.stride(0),
            h,
            d,
            sm_scale * LOG2E,
            GROUP=group,
            PAGE_SIZE=page_size,
            PARTITION_SIZE=partition_size,
            QUANTIZED=quantized,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_N=cfg["block_n"],
            BLOCK_D=block_d,
            SPLIT_D=cfg["split_d"],
            FAST_I8=cfg["fast_i8"],
            I8_QK=cfg["i8_qk"],
            LAZY=cfg["lazy"],
            PV_DTYPE=tl.float16 if cfg["fast_i8"] else _tl_dtype(q.dtype),
            num_warps=cfg["num_warps"],
            **options,
            **pdl_args(q),
            k_ptr=k,
            v_ptr=v,
            pos_ptr=pos,
            cos_ptr=cos,
            sin_ptr=sin,
            slots_ptr=slots,
            k_b_stride=k.stride(0),
            k_h_stride=k.stride(1),
            v_b_stride=v.stride(0),
            v_h_stride=v.stride(1),
            cos_row_stride=cos.stride(0),
            sin_row_stride=sin.stride(0),
            inv_qmax=INV_127,
            SCALE_BY_RECIPROCAL=scales_by_reciprocal(q.device),
            ROTARY=new_kv is not None,
        )
        pdl = pdl_args(q)
        lanes = 32 * cfg["num_warps"]  # a program's threads
        ahead_base, ahead_bytes, ahead_chunk = ahead_plan(q.device, pdl, b * h * lanes)
        _decode_reduce_kernel[(b, h)](
            mid_out,
            mid_max,
            mid_sum,
            ctx_lens,
            out,
            out.stride(0),
            out.stride(1),
            h,
            num_parts,
            d,
            ahead_base,
            ahead_bytes,
            ahead_chunk,
            PARTITION_SIZE=partition_size,
            BLOCK_P=min(32, triton.next_power_of_2(num_parts)),
            BLOCK_D=block_d,
            AHEAD=lanes if ahead_bytes else 0,
            num_warps=cfg["num_warps"],
            **pdl,
        )
    return out


@kernel_op("decode_attention")
def _decode_attention_op(
    q: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    sm_scale: float,
    partition_size: int,
) -> torch.Tensor:
    return _run(q, data_layer, scales_layer, block_tables, ctx_lens, sm_scale, partition_size)


@_decode_attention_op.register_fake
def _(q, data_layer, scales_layer, block_tables, ctx_lens, sm_scale, partition_size):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@kernel_op("rotary_store_decode_attention", ("data_layer", "scales_layer"))
def _rotary_store_decode_attention_op(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    sm_scale: float,
    partition_size: int,
) -> torch.Tensor:
    return _run(q, data_layer, scales_layer, block_tables, ctx_lens, sm_scale, partition_size,
                new_kv=(positions, k, v, cos, sin, slots))


@_rotary_store_decode_attention_op.register_fake
def _(positions, q, k, v, cos, sin, data_layer, scales_layer, slots, block_tables, ctx_lens,
      sm_scale, partition_size):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def softmax_scale(name: str, head_dim: int, sm_scale: float | None) -> float:
    """sm_scale, or 1 / sqrt(head_dim) when None. It must be positive: the tiles take the
    row max of the unscaled scores, which only a positive scale leaves in place."""
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if not scale > 0.0 or math.isinf(scale):
        raise ValueError(f"{name}: sm_scale must be a positive finite number, got {sm_scale}")
    return scale


def check_paged_cache(name: str, q, data_layer, scales_layer, block_tables) -> None:
    """Shared by decode and prefill: q [., H, D] against a [2, P, S, Hkv, D] layer."""
    check_float(name, q=q)
    check_index(name, block_tables=block_tables)
    check_last_dim_contiguous(name, q=q, data_layer=data_layer)
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be 3-D [tokens, H, D], got {tuple(q.shape)}")
    h, d = q.shape[1:]
    if data_layer.dim() != 5 or data_layer.shape[0] != 2 or data_layer.shape[4] != d:
        raise ValueError(
            f"{name}: data_layer must be [2, num_pages, page_size, Hkv, {d}], "
            f"got {tuple(data_layer.shape)}"
        )
    hkv = data_layer.shape[3]
    if h % hkv != 0:
        raise ValueError(f"{name}: query heads {h} must be a multiple of kv heads {hkv}")
    if data_layer.dtype == torch.int8:
        if scales_layer is None or scales_layer.shape != data_layer.shape[:4]:
            raise ValueError(
                f"{name}: an int8 cache needs scales_layer {tuple(data_layer.shape[:4])}, got "
                f"{None if scales_layer is None else tuple(scales_layer.shape)}"
            )
        if scales_layer.dtype != torch.float32:
            raise ValueError(f"{name}: scales_layer must be float32, got {scales_layer.dtype}")
    else:
        check_float(name, data_layer=data_layer)
        if scales_layer is not None:
            raise ValueError(
                f"{name}: scales_layer is only for int8 caches, data is {data_layer.dtype}"
            )
    if block_tables.dim() != 2:
        raise ValueError(
            f"{name}: block_tables must be [B, max_pages], got {tuple(block_tables.shape)}"
        )


def decode_attention(
    q: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    sm_scale: float | None = None,
    partition_size: int = 512,
) -> torch.Tensor:
    """q [B, H, D]; block_tables [B, max_pages]; ctx_lens [B] -> out [B, H, D] in q.dtype.

    Row b attends the first ctx_lens[b] tokens of its pages; ctx_lens[b] must not exceed
    max_pages * page_size (not checked on the device).
    """
    name = "decode_attention"
    _check_decode(name, q, data_layer, scales_layer, block_tables, ctx_lens, partition_size)
    scale = softmax_scale(name, q.shape[-1], sm_scale)
    return _decode_attention_op(
        q, data_layer, scales_layer, block_tables, ctx_lens, scale, int(partition_size)
    )


def _check_decode(name, q, data_layer, scales_layer, block_tables, ctx_lens, partition_size):
    tensors = [q, data_layer, block_tables, ctx_lens]
    check_launchable(name, *tensors, *([] if scales_layer is None else [scales_layer]))
    check_paged_cache(name, q, data_layer, scales_layer, block_tables)
    check_index(name, ctx_lens=ctx_lens)
    b = q.shape[0]
    if block_tables.shape[0] != b or ctx_lens.shape != (b,):
        raise ValueError(
            f"{name}: block_tables [B, P] and ctx_lens [B] must have B={b} rows, got "
            f"{tuple(block_tables.shape)} and {tuple(ctx_lens.shape)}"
        )
    if partition_size <= 0 or partition_size % 16 != 0:
        raise ValueError(
            f"{name}: partition_size must be a positive multiple of 16, got {partition_size}"
        )


def fuses_rotary_store(q: torch.Tensor, data_layer: torch.Tensor, partition_size: int) -> bool:
    """rotary_store_decode_attention runs as one launch for these shapes: FUSE_ROTARY_STORE
    is on and the tiles run in halves (the kernel rotates q by halves)."""
    if not FUSE_ROTARY_STORE:
        return False
    quantized = data_layer.dtype == torch.int8
    return launch_config(q, data_layer, partition_size, quantized)["split_d"]


def rotary_store_decode_attention(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    sm_scale: float | None = None,
    partition_size: int = 512,
) -> torch.Tensor:
    """A decode step's rotary_store_kv then decode_attention -> out [B, H, D].

    Arguments as those two functions take them, one token per sequence: slots[b] must be
    the slot of sequence b's token ctx_lens[b] - 1 (not checked on the device). Where
    fuses_rotary_store allows, one launch fewer: the program of the partition holding that
    token rotates k and stores K/V (the same values rotary_store_kv stores), and every
    program rotates its own copy of q; q is then left as it was, and a sequence with
    ctx_lens[b] == 0 stores nothing. Otherwise the two launches run, and q is rotated in
    place. So q's contents afterwards are not part of the contract."""
    name = "rotary_store_decode_attention"
    check_rotary_args(positions, q, k, cos, sin, name=name)
    _check(k, v, data_layer, scales_layer, slots, name=name)
    _check_decode(name, q, data_layer, scales_layer, block_tables, ctx_lens, partition_size)
    scale = softmax_scale(name, q.shape[-1], sm_scale)
    if not fuses_rotary_store(q, data_layer, partition_size):  # the two launches, checked above
        _rotary_store_kv_op(positions, q, k, v, cos, sin, data_layer, scales_layer, slots)
        return _decode_attention_op(q, data_layer, scales_layer, block_tables, ctx_lens, scale,
                                    int(partition_size))
    return _rotary_store_decode_attention_op(
        positions, q, k, v, cos, sin, data_layer, scales_layer, slots, block_tables, ctx_lens,
        scale, int(partition_size),
    )


def gather_kv_reference(
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    pages: torch.Tensor,
    num_tokens: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [num_tokens, Hkv, D] of one sequence, dequantized to dtype (as KVCache.gather)."""
    _, _, _, hkv, d = data_layer.shape
    kv = data_layer[:, pages.long()].reshape(2, -1, hkv, d)[:, :num_tokens]  # [2, L, Hkv, D]
    if scales_layer is not None:
        sc = scales_layer[:, pages.long()].reshape(2, -1, hkv)[:, :num_tokens]
        kv = (kv.float() * sc.unsqueeze(-1)).to(dtype)
    return kv[0].to(dtype), kv[1].to(dtype)


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale):
    """q [Q, H, D], k/v [L, Hkv, D], mask [Q, L] bool (True = keep) -> [Q, H, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k.transpose(-1, -2)) * scale  # [H, Q, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1)  # [Q, H, D]


def decode_attention_reference(
    q: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    page_size = data_layer.shape[2]
    out = torch.empty_like(q)
    for i, n in enumerate(ctx_lens.tolist()):
        pages = block_tables[i, : (n + page_size - 1) // page_size]
        k, v = gather_kv_reference(data_layer, scales_layer, pages, n, q.dtype)
        mask = torch.ones(1, n, dtype=torch.bool, device=q.device)
        out[i] = attend_reference(q[i : i + 1], k, v, mask, scale)[0]
    return out
