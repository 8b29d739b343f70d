"""Varlen causal prefill attention over a paged prefix (chunked prefill), online softmax.

q [T, H, D] packs the new tokens of B sequences (sequence b owns rows
cu_q_lens[b] : cu_q_lens[b + 1]). Their K/V are already in the cache, at the end of the
sequence's ctx_lens[b] tokens, so the query i of sequence b sits at absolute position
ctx - q_len + i and attends keys 0 .. ctx - q_len + i, all read through the block table.
One program per (query block, sequence, head); scores live only as a
[BLOCK_M, BLOCK_N] tile, never as a full matrix. int8 pages are dequantized in the
kernel (key scale on the scores, value scale folded into the probabilities).
Rows of q not covered by cu_q_lens are left unwritten in the output.
"""

import math

import torch

from kernels._triton import (
    check_index,
    check_launchable,
    device_guard,
    gpu_capability,
    kernel_op,
    pdl_args,
    pdl_wait,
    tl,
    triton,
)
from kernels.decode_attention import (
    LOG2E,
    _attend_tile,
    attend_reference,
    check_paged_cache,
    gather_kv_reference,
    softmax_scale,
)


@triton.jit
def _prefill_kernel(
    q_ptr,
    data_ptr,
    scales_ptr,
    block_tables_ptr,
    cu_q_lens_ptr,
    ctx_lens_ptr,
    out_ptr,
    q_t_stride,
    q_h_stride,
    o_t_stride,
    o_h_stride,
    d_kv_stride,
    d_page_stride,
    d_slot_stride,
    d_head_stride,
    s_kv_stride,
    s_page_stride,
    s_slot_stride,
    s_head_stride,
    bt_b_stride,
    head_dim,
    qk_scale,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    m_blk = tl.program_id(0)
    if HEAVY_FIRST:  # the last query blocks read the most keys: start them first
        m_blk = tl.num_programs(0) - 1 - m_blk
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(cu_q_lens_ptr + b).to(tl.int32)
    q_len = tl.load(cu_q_lens_ptr + b + 1).to(tl.int32) - q_start
    if m_blk * BLOCK_M >= q_len:
        return
    prefix = tl.load(ctx_lens_ptr + b).to(tl.int32) - q_len  # tokens before the new ones

    m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < q_len
    d_mask = d < head_dim
    q_pos = prefix + m  # [BLOCK_M] absolute positions
    tok = (q_start + m).to(tl.int64)
    q_ptrs = q_ptr + tok[:, None] * q_t_stride + h * q_h_stride + d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + b * bt_b_stride
    # the last row of this block sees keys up to its own position; rows past q_len see
    # keys < kv_end too, so no row is ever fully masked (key 0 is visible to all)
    kv_end = tl.minimum(prefix + (m_blk + 1) * BLOCK_M, prefix + q_len)
    # keys before the block's first position are visible to every row: whole tiles of them
    # need no causal mask (only the tiles that reach the diagonal do)
    full_end = 0
    if SPLIT:
        full_end = tl.minimum((prefix + m_blk * BLOCK_M) // BLOCK_N * BLOCK_N, kv_end)
    for n0 in range(0, full_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(
            q, q_pos, n, kv_end, kvh, d, d_mask, data_ptr, scales_ptr, table, m_i, l_i, acc,
            qk_scale, d_kv_stride, d_page_stride, d_slot_stride, d_head_stride, s_kv_stride,
            s_page_stride, s_slot_stride, s_head_stride, PAGE_SIZE, QUANTIZED, DOT_PRECISION,
            "none",
        )
    for n0 in range(full_end, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(
            q, q_pos, n, kv_end, kvh, d, d_mask, data_ptr, scales_ptr, table, m_i, l_i, acc,
            qk_scale, d_kv_stride, d_page_stride, d_slot_stride, d_head_stride, s_kv_stride,
            s_page_stride, s_slot_stride, s_head_stride, PAGE_SIZE, QUANTIZED, DOT_PRECISION,
            "causal",
        )

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + tok[:, None] * o_t_stride + h * o_h_stride + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# Launch override {"block_m", "block_n", "num_warps", "num_stages", "split", "heavy_first"}:
# set only by bench/prefill_attn_tune.py, which sweeps them on a GPU. None: _launch's rules.
TUNING: dict | None = None


def _launch(device: torch.device, head_dim: int, dtype: torch.dtype, quantized: bool,
            max_q_len: int) -> dict:
    """Launch parameters: tensor-core tiles on GPU, small ones in the interpreter.

    Long bf16/fp16 prompts take 128 x 128 tiles over 8 warps: 331 TFLOP/s against 265 for
    64 x 64 over 4 (H200, B4 x S4096 x H32 x D128, bench/prefill_attn_tune.py); shorter
    ones (and fp32 / int8 pages, whose wider tiles would not fit in shared memory) keep
    64 x 64. Everywhere: unmasked tiles left of the diagonal, longest query blocks first.
    """
    cfg = dict(block_m=16, block_n=16, num_warps=1, num_stages=None, split=True, heavy_first=True)
    if TUNING is not None:
        cfg.update(TUNING)
    elif gpu_capability(device) is not None:
        if head_dim > 128:
            cfg.update(block_m=64, block_n=32, num_warps=8)
        elif dtype in (torch.bfloat16, torch.float16) and not quantized and max_q_len >= 512:
            cfg.update(block_m=128, block_n=128, num_warps=8, num_stages=3)
        else:
            cfg.update(block_m=64, block_n=64, num_warps=4)
    return cfg


@kernel_op("prefill_attention")
def _prefill_attention_op(
    q: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    max_q_len: int,
    sm_scale: float,
) -> torch.Tensor:
    t, h, d = q.shape
    num_seqs = ctx_lens.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if t == 0 or num_seqs == 0 or max_q_len == 0:
        return out
    quantized = scales_layer is not None
    s_strides = scales_layer.stride() if quantized else (0, 0, 0, 0)
    cfg = _launch(q.device, d, q.dtype, quantized, max_q_len)
    block_m = cfg["block_m"]
    options = {"num_stages": cfg["num_stages"]} if cfg["num_stages"] else {}
    with device_guard(q):
        _prefill_kernel[(triton.cdiv(max_q_len, block_m), num_seqs, h)](
            q,
            data_layer,
            scales_layer if quantized else data_layer,
            block_tables,
            cu_q_lens,
            ctx_lens,
            out,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            *data_layer.stride()[:4],
            *s_strides,
            block_tables.stride(0),
            d,
            sm_scale * LOG2E,
            GROUP=h // data_layer.shape[3],
            PAGE_SIZE=data_layer.shape[2],
            QUANTIZED=quantized,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            SPLIT=cfg["split"],
            HEAVY_FIRST=cfg["heavy_first"],
            BLOCK_M=block_m,
            BLOCK_N=cfg["block_n"],
            BLOCK_D=max(16, triton.next_power_of_2(d)),
            num_warps=cfg["num_warps"],
            **options,
            **pdl_args(q),
        )
    return out


@_prefill_attention_op.register_fake
def _(q, data_layer, scales_layer, block_tables, cu_q_lens, ctx_lens, max_q_len, sm_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def cu_seqlens(q_lens: torch.Tensor) -> torch.Tensor:
    """q_lens [B] -> cu_q_lens [B + 1] int32 (0, q0, q0 + q1, ...)."""
    return torch.nn.functional.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32)


def prefill_attention(
    q: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    max_q_len: int | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """q [T, H, D]; cu_q_lens [B + 1]; ctx_lens [B]; block_tables [B, max_pages] -> [T, H, D].

    ctx_lens count each sequence's tokens after this step (new ones included, already
    stored). max_q_len sizes the grid; leave it None to read it from cu_q_lens (one host
    sync). Lengths are not checked on the device: q_len <= ctx_len <= max_pages * page_size.
    """
    name = "prefill_attention"
    tensors = [q, data_layer, block_tables, cu_q_lens, ctx_lens]
    check_launchable(name, *tensors, *([] if scales_layer is None else [scales_layer]))
    check_paged_cache(name, q, data_layer, scales_layer, block_tables)
    check_index(name, cu_q_lens=cu_q_lens, ctx_lens=ctx_lens)
    b = ctx_lens.shape[0]
    if ctx_lens.dim() != 1 or cu_q_lens.shape != (b + 1,) or block_tables.shape[0] != b:
        raise ValueError(
            f"{name}: need ctx_lens [B], cu_q_lens [B + 1], block_tables [B, P]; got "
            f"{tuple(ctx_lens.shape)}, {tuple(cu_q_lens.shape)}, {tuple(block_tables.shape)}"
        )
    if max_q_len is None:
        max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max()) if b > 0 else 0
    if max_q_len < 0:
        raise ValueError(f"{name}: max_q_len must be >= 0, got {max_q_len}")
    scale = softmax_scale(name, q.shape[-1], sm_scale)
    return _prefill_attention_op(
        q, data_layer, scales_layer, block_tables, cu_q_lens, ctx_lens, int(max_q_len), scale
    )


def prefill_attention_reference(
    q: torch.Tensor,
    data_layer: torch.Tensor,
    scales_layer: torch.Tensor | None,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    page_size = data_layer.shape[2]
    out = torch.zeros_like(q)
    bounds = cu_q_lens.tolist()
    for i, n in enumerate(ctx_lens.tolist()):
        start, end = bounds[i], bounds[i + 1]
        pages = block_tables[i, : (n + page_size - 1) // page_size]
        k, v = gather_kv_reference(data_layer, scales_layer, pages, n, q.dtype)
        q_pos = torch.arange(n - (end - start), n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [Q, L]
        out[start:end] = attend_reference(q[start:end], k, v, mask, scale)
    return out
