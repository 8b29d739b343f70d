"""Kernel tests run on CUDA when there is one, else on CPU through Triton's interpreter.

TRITON_INTERPRET must be in the environment before triton is first imported (the
@triton.jit decorator reads it when a kernel module is imported), hence it is set here,
at conftest import, before any test module imports kernels.*.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _make_layer(num_pages, num_kv_heads, head_dim, kv_dtype, device, page_size=16):
    """A random cache layer: data [2, P, S, Hkv, D] (+ float32 scales [2, P, S, Hkv] for int8)."""
    x = torch.randn(2, num_pages, page_size, num_kv_heads, head_dim, device=device)
    if kv_dtype != torch.int8:
        return x.to(kv_dtype), None
    scales = x.abs().amax(-1).clamp_min(1e-8) / 127.0
    data = torch.round(x / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return data, scales


def _make_block_tables(ctx_lens, num_pages, max_pages, device, dtype=torch.int32, pad=0):
    """[B, max_pages]: each row a random set of distinct pages, padded with `pad` past its end."""
    rows = []
    for n in ctx_lens:
        used = -(-n // 16)
        row = torch.full((max_pages,), pad, dtype=torch.int64)
        row[:used] = torch.randperm(num_pages)[:used]
        rows.append(row)
    return torch.stack(rows).to(device=device, dtype=dtype)


@pytest.fixture
def make_layer():
    return _make_layer


@pytest.fixture
def make_block_tables():
    return _make_block_tables
