"""Paged KV cache storage: fp32/bf16/fp16 pages, or int8 pages with per-token-per-head scales.

Layout (the contract kvtransfer relies on):
  data   [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]   (2 = K, V)
  scales [num_layers, 2, num_pages, page_size, num_kv_heads] float32     (int8 only)
int8 is symmetric: x ~= q * scale, scale = max|x| / 127 over head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.page_pool import PAGE_SIZE

KV_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "int8": torch.int8,
}


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto` means the model's dtype; otherwise one of KV_DTYPES."""
    if name == "auto":
        return model_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"kv dtype must be auto or one of {sorted(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float -> ([..., D] int8, [...] float32 scale); symmetric per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-8) / 127.0  # [...]
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


@dataclass
class KVCacheSpec:
    num_layers: int
    num_pages: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_size: int = PAGE_SIZE

    def bytes_per_page(self) -> int:
        """K+V bytes of one page over all layers, scales included."""
        elems = 2 * self.num_layers * self.page_size * self.num_kv_heads
        size = elems * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return size + (elems * 4 if self.dtype == torch.int8 else 0)


class KVCache:
    """The tensors behind the page pool. Allocated once; never moved (CUDA graphs rely on it)."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        s = spec
        shape = (s.num_layers, 2, s.num_pages, s.page_size, s.num_kv_heads, s.head_dim)
        self.data = torch.zeros(shape, dtype=s.dtype, device=device)
        self.quantized = s.dtype == torch.int8
        self.scales = (
            torch.zeros(shape[:-1], dtype=torch.float32, device=device) if self.quantized else None
        )

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write new tokens. k, v: [T, Hkv, D]; slots: [T] flat slot = page * page_size + offset."""
        s = self.spec
        flat = self.data[layer].view(2, s.num_pages * s.page_size, s.num_kv_heads, s.head_dim)
        if self.quantized:
            kq, ks = quantize_int8(k)
            vq, vs = quantize_int8(v)
            sc = self.scales[layer].view(2, s.num_pages * s.page_size, s.num_kv_heads)
            sc[0].index_copy_(0, slots, ks)
            sc[1].index_copy_(0, slots, vs)
            k, v = kq, vq
        flat[0].index_copy_(0, slots, k.to(flat.dtype))
        flat[1].index_copy_(0, slots, v.to(flat.dtype))

    def gather(
        self, layer: int, block_table: torch.Tensor, num_tokens: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one sequence: block_table [n_pages] -> ([num_tokens, Hkv, D], same), dequantized."""
        s = self.spec
        kv = self.data[layer][:, block_table]  # [2, n_pages, S, Hkv, D]
        kv = kv.reshape(2, -1, s.num_kv_heads, s.head_dim)[:, :num_tokens]
        if self.quantized:
            sc = self.scales[layer][:, block_table].reshape(2, -1, s.num_kv_heads)[:, :num_tokens]
            kv = dequantize_int8(kv, sc, dtype)
        return kv[0].to(dtype), kv[1].to(dtype)

    def gather_batch(
        self, layer: int, block_tables: torch.Tensor, max_tokens: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """block_tables [B, P] -> K, V [B, max_tokens, Hkv, D] (rows past each length are junk)."""
        s = self.spec
        b = block_tables.shape[0]
        kv = self.data[layer][:, block_tables]  # [2, B, P, S, Hkv, D]
        kv = kv.reshape(2, b, -1, s.num_kv_heads, s.head_dim)[:, :, :max_tokens]
        if self.quantized:
            sc = self.scales[layer][:, block_tables].reshape(2, b, -1, s.num_kv_heads)
            kv = dequantize_int8(kv, sc[:, :, :max_tokens], dtype)
        return kv[0].to(dtype), kv[1].to(dtype)
