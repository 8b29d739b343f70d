"""MoE kernels: routing (softmax top-k), the row packing of the EP dispatch, and the
gather-sum that combines expert outputs.

Routing: router logits -> softmax -> top-k experts (+ optional renormalization).

One program per token row: the row's E logits sit in registers, the softmax is taken in
fp32, and the k largest probabilities are picked by k rounds of max + argmax, each round
masking out the expert it picked (ties go to the lower expert id). With `renormalize` the
k picked probabilities are divided by their sum (Mixtral always; Qwen3-MoE when its
config says `norm_topk_prob`). Outputs: weights [T, k] float32 and expert ids [T, k] int32,
the k picks in descending weight order, as `torch.topk` returns them.
"""

import torch

from kernels._triton import (
    check_float,
    check_index,
    check_last_dim_contiguous,
    check_launchable,
    device_guard,
    kernel_op,
    tl,
    triton,
)

MAX_EXPERTS = 1024  # one row of logits must fit one program's registers


@triton.jit
def _moe_route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    logits_row_stride,
    num_experts,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < num_experts
    x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)  # [BLOCK_E]
    e = tl.exp(x - tl.max(x, axis=0))
    p = e / tl.sum(e, axis=0)
    p = tl.where(mask, p, -1.0)  # padding never wins a round
    ks = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, cols, BLOCK_E), axis=0)  # lowest id among ties
        weights = tl.where(ks == j, best, weights)
        ids = tl.where(ks == j, idx, ids)
        p = tl.where(cols == idx, -1.0, p)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    out = ks < TOP_K
    tl.store(weights_ptr + row * TOP_K + ks, weights, mask=out)
    tl.store(ids_ptr + row * TOP_K + ks, ids, mask=out)


@kernel_op("moe_route")
def _moe_route_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t, num_experts = logits.shape
    weights = logits.new_empty((t, top_k), dtype=torch.float32)
    ids = logits.new_empty((t, top_k), dtype=torch.int32)
    if t == 0:
        return weights, ids
    with device_guard(logits):
        _moe_route_kernel[(t,)](
            logits, weights, ids, logits.stride(0), num_experts,
            TOP_K=top_k, RENORMALIZE=renormalize,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=4 if num_experts <= 256 else 8,
        )
    return weights, ids


@_moe_route_op.register_fake
def _(logits, top_k, renormalize):
    t = logits.shape[0]
    return (logits.new_empty((t, top_k), dtype=torch.float32),
            logits.new_empty((t, top_k), dtype=torch.int32))


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int32)."""
    name = "moe_route"
    check_launchable(name, logits)
    check_float(name, logits=logits)
    check_last_dim_contiguous(name, logits=logits)
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be [tokens, experts], got {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{name}: number of experts must be in 1..{MAX_EXPERTS}, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{name}: top_k must be in 1..{num_experts}, got {top_k}")
    return _moe_route_op(logits, int(top_k), bool(renormalize))


def moe_route_reference(logits: torch.Tensor, top_k: int, renormalize: bool):
    """The torch reference: what HF's Qwen3-MoE / Mixtral routers compute."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


# ---- gather-sum: out[m] = sum_j w[m, j] * src[pos[m, j]] (pos < 0: nothing) ----


@triton.jit
def _moe_gather_sum_kernel(
    src_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    src_row_stride,
    out_row_stride,
    hidden,
    SLOTS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        p = tl.load(pos_ptr + row * SLOTS + j).to(tl.int64)
        live = cols < tl.where(p >= 0, hidden, 0)  # [BLOCK_H]; nothing when pos < 0
        x = tl.load(src_ptr + p * src_row_stride + cols, mask=live, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            x = x * tl.load(w_ptr + row * SLOTS + j)
        acc += x
    tl.store(out_ptr + row * out_row_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@kernel_op("moe_gather_sum")
def _moe_gather_sum_op(src: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    m, slots = pos.shape
    hidden = src.shape[1]
    out = src.new_empty((m, hidden))
    if m == 0 or hidden == 0:
        return out
    block = min(triton.next_power_of_2(hidden), 1024)
    with device_guard(src):
        _moe_gather_sum_kernel[(m, triton.cdiv(hidden, block))](
            src, pos, weights if weights is not None else pos, out, src.stride(0), out.stride(0), hidden,
            SLOTS=slots, HAS_WEIGHTS=weights is not None, BLOCK_H=block, num_warps=4,
        )
    return out


@_moe_gather_sum_op.register_fake
def _(src, pos, weights):
    return src.new_empty((pos.shape[0], src.shape[1]))


def moe_gather_sum(src: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """src [N, H], pos [M, S] row of src or -1, weights [M, S] float32 or None -> [M, H] in src.dtype.

    Each output row reads its <= S source rows and adds them in fp32: the MoE sums (a row's
    weighted expert outputs; a token's partial sums from each rank) without atomics.
    """
    name = "moe_gather_sum"
    check_launchable(name, src, pos, *([] if weights is None else [weights]))
    check_float(name, src=src)
    check_index(name, pos=pos)
    check_last_dim_contiguous(name, src=src)
    if src.dim() != 2 or pos.dim() != 2:
        raise ValueError(f"{name}: src must be [N, H] and pos [M, S], got {tuple(src.shape)}, {tuple(pos.shape)}")
    if not pos.is_contiguous():
        raise ValueError(f"{name}: pos must be contiguous; call .contiguous() first")
    if weights is not None and (weights.shape != pos.shape or weights.dtype != torch.float32
                                or not weights.is_contiguous()):
        raise ValueError(f"{name}: weights must be contiguous float32 shaped like pos {tuple(pos.shape)}, "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    return _moe_gather_sum_op(src, pos, weights)


def moe_gather_sum_reference(src: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None):
    padded = torch.cat([src.float(), src.new_zeros(1, src.shape[1], dtype=torch.float32)])  # row N = zeros
    picked = padded[torch.where(pos < 0, src.shape[0], pos).long()]  # [M, S, H]
    if weights is not None:
        picked = picked * weights.unsqueeze(-1)
    return picked.sum(1).to(src.dtype)


# ---- pack: out[i] = x[token[i]] ++ meta[i] (the rows the EP dispatch sends) ----

_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _moe_pack_rows_kernel(
    x_ptr,
    token_ptr,
    meta_ptr,
    out_ptr,
    x_row_stride,
    hidden,
    meta_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    width = hidden + meta_cols
    src = tl.load(token_ptr + row).to(tl.int64)
    in_x = cols < hidden
    in_meta = (cols >= hidden) & (cols < width)
    a = tl.load(x_ptr + src * x_row_stride + cols, mask=in_x, other=0)
    b = tl.load(meta_ptr + row * meta_cols + (cols - hidden), mask=in_meta, other=0)
    tl.store(out_ptr + row * width + cols, tl.where(in_x, a, b), mask=cols < width)


@kernel_op("moe_pack_rows")
def _moe_pack_rows_op(x: torch.Tensor, token: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    n, hidden, cols = token.shape[0], x.shape[1], meta.shape[1]
    out = x.new_empty((n, hidden + cols))
    if n == 0 or hidden + cols == 0:
        return out
    bits = _SAME_SIZE_INT[x.element_size()]  # moved as integers: metadata bits pass unchanged
    block = min(triton.next_power_of_2(hidden + cols), 1024)
    with device_guard(x):
        _moe_pack_rows_kernel[(n, triton.cdiv(hidden + cols, block))](
            x.view(bits), token, meta.view(bits), out.view(bits), x.stride(0), hidden, cols,
            BLOCK=block, num_warps=4,
        )
    return out


@_moe_pack_rows_op.register_fake
def _(x, token, meta):
    return x.new_empty((token.shape[0], x.shape[1] + meta.shape[1]))


def moe_pack_rows(x: torch.Tensor, token: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """x [T, H], token [N] row of x, meta [N, M] (same element size as x) -> [N, H + M].

    Row i is x[token[i]] followed by meta[i], bits copied: the dispatch's send buffer
    (token rows with their expert ids and weights as extra columns) in one pass.
    """
    name = "moe_pack_rows"
    check_launchable(name, x, token, meta)
    check_index(name, token=token)
    check_last_dim_contiguous(name, x=x)
    if x.dim() != 2 or token.dim() != 1 or meta.dim() != 2 or meta.shape[0] != token.shape[0]:
        raise ValueError(f"{name}: need x [T, H], token [N], meta [N, M]; got {tuple(x.shape)}, "
                         f"{tuple(token.shape)}, {tuple(meta.shape)}")
    if meta.element_size() != x.element_size() or not meta.is_contiguous() or not token.is_contiguous():
        raise ValueError(f"{name}: token and meta must be contiguous and meta's elements as wide as x's "
                         f"({x.element_size()} bytes); view the metadata as {x.dtype}")
    return _moe_pack_rows_op(x, token, meta)


def moe_pack_rows_reference(x: torch.Tensor, token: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    bits = _SAME_SIZE_INT[x.element_size()]
    return torch.cat([x.view(bits)[token.long()], meta.view(bits)], dim=1).view(x.dtype)
