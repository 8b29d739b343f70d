"""Attention over the paged KV cache: per-step metadata and the torch reference backend.

Every sequence in a step contributes `q_len` new tokens that sit at the end of its
`ctx_len` tokens of context (new tokens included): a decode row has q_len == 1, a
prefill chunk q_len > 1 over a possibly non-empty prefix. New K/V are stored into the
cache first, then attention reads everything back from the cache, so chunked and
unchunked prefill (and int8 or not) see exactly the same keys.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    q_lens: list[int]  # new tokens per sequence
    ctx_lens: list[int]  # tokens of context per sequence after this step
    block_tables: torch.Tensor  # [B, max_pages] int64 page ids (padded with 0)
    slots: torch.Tensor  # [T] int64 flat slot of each new token
    ctx_lens_t: torch.Tensor  # [B] int64, ctx_lens as a tensor
    cu_q_lens: torch.Tensor | None = None  # [B + 1] int32 start of each sequence's rows (prefill)

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.q_lens)

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hkv, G*Q, D], k/v [B, Hkv, L, D], mask [B, 1, Q*G or 1, L] bool (True = keep)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, GQ, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)  # [B, Hkv, GQ, D]


def decode_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata):
    """q [B, H, D] (one token per sequence) -> [B, H, D]."""
    b, h, d = q.shape
    hkv = cache.spec.num_kv_heads
    g = h // hkv
    max_ctx = max(meta.ctx_lens)
    k, v = cache.gather_batch(layer, meta.block_tables, max_ctx, q.dtype)  # [B, L, Hkv, D]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D]
    pos = torch.arange(max_ctx, device=q.device)
    mask = (pos[None, :] < meta.ctx_lens_t[:, None]).view(b, 1, 1, max_ctx)
    out = _attend(q.view(b, hkv, g, d), k, v, mask)  # [B, Hkv, G, D]
    return out.reshape(b, h, d)


def prefill_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata):
    """q [T, H, D] packed over sequences -> [T, H, D]; causal, offset by each prefix."""
    t, h, d = q.shape
    hkv = cache.spec.num_kv_heads
    g = h // hkv
    out = torch.empty_like(q)
    start = 0
    for i, (ql, cl) in enumerate(zip(meta.q_lens, meta.ctx_lens)):
        pages = meta.block_tables[i, : (cl + cache.page_size - 1) // cache.page_size]
        k, v = cache.gather(layer, pages, cl, q.dtype)  # [L, Hkv, D]
        qi = q[start : start + ql].view(ql, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, Q, D]
        # query i (absolute position cl - ql + i) sees keys 0 .. cl - ql + i
        qpos = torch.arange(cl - ql, cl, device=q.device)
        mask = torch.arange(cl, device=q.device)[None, :] <= qpos[:, None]  # [Q, L]
        o = _attend(
            qi.reshape(1, hkv, g * ql, d),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            mask.repeat(g, 1).view(1, 1, g * ql, cl),
        )  # [1, Hkv, G*Q, D]
        out[start : start + ql] = o.view(hkv, g, ql, d).permute(2, 0, 1, 3).reshape(ql, h, d)
        start += ql
    return out


def paged_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata):
    """Dispatch: all-decode steps take the batched path, anything else the per-sequence one."""
    if meta.is_decode:
        return decode_attention(q, cache, layer, meta)
    return prefill_attention(q, cache, layer, meta)


def decode_partition_size(num_seqs: int, num_kv_heads: int) -> int:
    """Tokens per split-K partition of decode attention, from shapes only (graph-safe).

    One program walks its partition serially, so with few (sequence, kv head) pairs long
    partitions leave most SMs idle (measured on H200: 12 us per layer at 8 x 3 pairs,
    ctx 512, partition 512). Short partitions while pairs are few; 512 once they fill
    the GPU (on H200 at 32 x 8 pairs, ctx 8192, bf16: 0.41 ms with 512, 0.48 with 256).
    """
    pairs = num_seqs * num_kv_heads
    if pairs <= 32:
        return 64
    return 128 if pairs <= 128 else 512


class AttentionBackend(ABC):
    """Stores a step's new K/V into the paged cache, then attends over the cache.

    Chosen once per engine (`engine.backend.select_backend`). Implementations must not
    branch on tensor values: the decode path runs inside CUDA graphs.
    """

    name: str
    # True: forward takes rotary=(positions, cos, sin) and applies rotary itself, q and k
    # unrotated on the way in (the decoder then skips its own rotary op)
    fuses_rotary: bool = False
    # True: forward takes ahead=the weight the next kernels read (the o projection's), which
    # its kernels may ask L2 for while they run (kernels.prefetch.ahead)
    prefetches_ahead: bool = False

    @abstractmethod
    def forward(self, q, k, v, cache: KVCache, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (this step's tokens) -> attention output [T, H, D]."""


class TorchAttention(AttentionBackend):
    """The reference: index_copy into the cache, gather, matmul + softmax (CPU numerics)."""

    name = "torch"

    def forward(self, q, k, v, cache, layer, meta):
        cache.store(layer, k, v, meta.slots)
        return paged_attention(q, cache, layer, meta)


class CPUAttention(TorchAttention):
    """The torch reference, but decode steps attend in one C call per layer
    (kernels/cpu.c: pages read in place through the block table, no gather copy)."""

    def __init__(self) -> None:
        from kernels import cpu

        self._k = cpu
        self._meta, self._max_ctx = None, None  # the step whose tables were last checked

    def forward(self, q, k, v, cache, layer, meta):
        cache.store(layer, k, v, meta.slots)
        if meta.is_decode:
            q = q.contiguous()
            data = cache.data[layer]
            scales = cache.scales[layer] if cache.quantized else None
            if self._k.decode_attention_fits(q, data, scales, meta.block_tables, meta.ctx_lens_t):
                if meta is not self._meta:  # the C code trusts every index: check once a step
                    self._meta = meta
                    self._max_ctx = self._k.decode_attention_bounds(meta.block_tables, meta.ctx_lens_t,
                                                                    data.shape[1])
                if self._max_ctx is not None:
                    return self._k.decode_attention(q, data, scales, meta.block_tables, meta.ctx_lens_t,
                                                    self._max_ctx)
        return paged_attention(q, cache, layer, meta)


class TritonAttention(AttentionBackend):
    """kernels/: store_kv (int8 quantized on write) with rotary fused in, split-K decode,
    varlen paged prefill."""

    name = "triton"
    fuses_rotary = True
    prefetches_ahead = True

    def __init__(self) -> None:
        import kernels.ops as k  # lazy, see engine.layers.TritonOps
        import kernels.prefetch

        self._k = k
        self._ahead = kernels.prefetch.ahead

    def forward(self, q, k, v, cache, layer, meta, rotary=None, ahead=None):
        """rotary: (positions [T], cos, sin [max_position, D]) when q, k are not rotated yet;
        one kernel then rotates q in place and stores rotated k (k itself stays unrotated).
        ahead: the weight read next (kernels.prefetch.ahead; a hint, no value changes)."""
        with self._ahead(ahead):
            return self._forward(q, k, v, cache, layer, meta, rotary)

    def _forward(self, q, k, v, cache, layer, meta, rotary):
        data = cache.data[layer]  # [2, P, S, Hkv, D]
        scales = cache.scales[layer] if cache.quantized else None
        if meta.is_decode and rotary is not None:
            psize = decode_partition_size(q.shape[0], data.shape[3])
            if self._k.fuses_rotary_store(q, data, psize):  # one launch: rotary, store, attention
                positions, cos, sin = rotary
                return self._k.rotary_store_decode_attention(
                    positions, q, k, v, cos, sin, data, scales, meta.slots, meta.block_tables,
                    meta.ctx_lens_t, partition_size=psize,
                )
        if rotary is None:
            self._k.store_kv(k, v, data, scales, meta.slots)
        else:
            positions, cos, sin = rotary
            self._k.rotary_store_kv(positions, q, k, v, cos, sin, data, scales, meta.slots)
        if meta.is_decode:
            psize = decode_partition_size(q.shape[0], data.shape[3])
            return self._k.decode_attention(
                q, data, scales, meta.block_tables, meta.ctx_lens_t, partition_size=psize
            )
        if meta.cu_q_lens is None:
            raise ValueError("prefill steps on the triton backend need AttentionMetadata.cu_q_lens")
        return self._k.prefill_attention(
            q, data, scales, meta.block_tables, meta.cu_q_lens, meta.ctx_lens_t, meta.max_q_len
        )
