"""kernels.prefill_attention: varlen causal attention over paged prefixes vs torch."""

import pytest
import torch

pytest.importorskip("triton")

from engine.attention import AttentionMetadata  # noqa: E402
from engine.attention import prefill_attention as engine_prefill_attention  # noqa: E402
from engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from kernels.prefill_attention import (  # noqa: E402
    cu_seqlens,
    prefill_attention,
    prefill_attention_reference,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}

# (H, Hkv, D, q_lens, ctx_lens): whole prompts (q == ctx), chunks over a prefix, one-token
# rows, an empty row, query blocks past 16 rows, lengths off the page grid; GQA 1, 3, 4, 8
CASES = [
    (4, 4, 32, [37, 5, 1], [37, 21, 1]),
    (12, 4, 64, [20, 0, 3], [60, 16, 99]),
    (8, 2, 16, [33, 16], [33, 48]),
    (8, 1, 24, [1, 18], [100, 50]),
]


def _check(
    h, hkv, d, q_lens, ctx_lens, kv_dtype, q_dtype, device, make_layer, make_block_tables, **kw
):
    num_pages = kw.pop("num_pages", 24)
    data, scales = make_layer(num_pages, hkv, d, kv_dtype, device)
    max_pages = max(-(-n // 16) for n in ctx_lens) + 1
    tables = make_block_tables(ctx_lens, num_pages, max_pages, device, **kw.pop("table", {}))
    cu = cu_seqlens(torch.tensor(q_lens, device=device))
    ctx = torch.tensor(ctx_lens, device=device)
    q = torch.randn(sum(q_lens), h, d, device=device).to(q_dtype)
    out = prefill_attention(q, data, scales, tables, cu, ctx, **kw)
    ref = prefill_attention_reference(q, data, scales, tables, cu, ctx)
    rtol, atol = TOL[q_dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("h,hkv,d,q_lens,ctx_lens", CASES)
@pytest.mark.parametrize(
    "kv_dtype,q_dtype",
    [(torch.float32, torch.float32), (torch.int8, torch.float32), (torch.float16, torch.float16)],
)
def test_prefill_matches_reference(
    h, hkv, d, q_lens, ctx_lens, kv_dtype, q_dtype, device, make_layer, make_block_tables
):
    _check(h, hkv, d, q_lens, ctx_lens, kv_dtype, q_dtype, device, make_layer, make_block_tables)


def test_prefill_explicit_max_q_len_and_int64_tables(device, make_layer, make_block_tables):
    table = {"dtype": torch.int64, "pad": 10**9}  # padding never dereferenced
    _check(
        4, 2, 32, [9, 30], [40, 30], torch.int8, torch.float32, device, make_layer,
        make_block_tables, table=table, max_q_len=30,
    )  # fmt: skip


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_prefill_matches_engine_attention(kv_dtype, device):
    """Chunked prefill as the engine runs it: K/V stored first, then attention over the cache."""
    spec = KVCacheSpec(num_layers=1, num_pages=10, num_kv_heads=2, head_dim=32, dtype=kv_dtype)
    cache = KVCache(spec, device)
    q_lens, ctx_lens = [7, 25], [30, 25]
    tables = torch.tensor([[3, 7, 0], [1, 8, 0]], device=device)
    slots = []
    for i, n in enumerate(ctx_lens):
        row = tables[i].tolist()
        slots += [row[j // 16] * 16 + j % 16 for j in range(n)]
    slots = torch.tensor(slots, device=device)
    cache.store(
        0,
        torch.randn(len(slots), 2, 32, device=device),
        torch.randn(len(slots), 2, 32, device=device),
        slots,
    )
    meta = AttentionMetadata(
        q_lens=q_lens,
        ctx_lens=ctx_lens,
        block_tables=tables,
        slots=slots,
        ctx_lens_t=torch.tensor(ctx_lens, device=device),
    )
    q = torch.randn(sum(q_lens), 6, 32, device=device)
    scales = cache.scales[0] if cache.quantized else None
    cu = cu_seqlens(torch.tensor(q_lens, device=device))
    out = prefill_attention(q, cache.data[0], scales, tables, cu, meta.ctx_lens_t)
    torch.testing.assert_close(
        out, engine_prefill_attention(q, cache, 0, meta), rtol=1e-4, atol=1e-5
    )


def test_prefill_rejects_bad_inputs(device, make_layer, make_block_tables):
    data, scales = make_layer(4, 2, 16, torch.float32, device)
    tables = make_block_tables([20], 4, 2, device)
    q = torch.randn(5, 4, 16, device=device)
    ctx = torch.tensor([20], device=device)
    cu = torch.tensor([0, 5], device=device)
    with pytest.raises(ValueError, match="cu_q_lens"):
        prefill_attention(q, data, scales, tables, cu[:1], ctx)
    with pytest.raises(ValueError, match=r"data_layer must be"):
        prefill_attention(torch.randn(5, 4, 8, device=device), data, scales, tables, cu, ctx)
    with pytest.raises(ValueError, match="only for int8"):
        prefill_attention(q, data, torch.ones(2, 4, 16, 2, device=device), tables, cu, ctx)
    for bad in (0.0, -0.25, float("inf"), float("nan")):  # the tiles need a positive scale
        with pytest.raises(ValueError, match="sm_scale must be a positive"):
            prefill_attention(q, data, scales, tables, cu, ctx, sm_scale=bad)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "h,hkv,d,q_lens,ctx_lens",
    [
        (32, 8, 128, [1000, 1, 77, 513], [1000, 2049, 300, 1024]),
        (24, 8, 64, [2048], [4000]),
        (16, 16, 128, [129, 64, 63], [129, 64, 63]),
        (12, 4, 80, [300, 10], [300, 700]),
    ],
)
@pytest.mark.parametrize(
    "kv_dtype,q_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.int8, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_prefill_gpu(h, hkv, d, q_lens, ctx_lens, kv_dtype, q_dtype, make_layer, make_block_tables):
    _check(
        h, hkv, d, q_lens, ctx_lens, kv_dtype, q_dtype, "cuda", make_layer, make_block_tables,
        num_pages=1024,
    )  # fmt: skip
