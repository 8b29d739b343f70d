"""A decode step (store K/V, then decode attention) captured once in a CUDA graph and replayed.

What the decode worker relies on: no host sync or value-dependent launch inside the
kernels, so one capture serves every step whose inputs are copied into static buffers,
padding rows included (slot -1 is skipped, ctx_len 0 yields zeros).
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from kernels.kv_store import store_kv, store_kv_reference  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, H, HKV, D, PAGES, MAX_PAGES = 8, 16, 4, 64, 160, 16


def _step(q, k, v, data, scales, tables, ctx, slots):
    store_kv(k, v, data, scales, slots)
    return decode_attention(q, data, scales, tables, ctx, partition_size=64)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16])
def test_decode_step_replays_in_cuda_graph(kv_dtype):
    dev = "cuda"
    data = torch.zeros(2, PAGES, 16, HKV, D, dtype=kv_dtype, device=dev)
    scales = torch.zeros(2, PAGES, 16, HKV, device=dev) if kv_dtype == torch.int8 else None
    q = torch.zeros(B, H, D, dtype=torch.bfloat16, device=dev)
    k, v = torch.zeros(B, HKV, D, dtype=torch.bfloat16, device=dev), torch.zeros_like(q[:, :HKV])
    tables = torch.zeros(B, MAX_PAGES, dtype=torch.int32, device=dev)
    ctx = torch.zeros(B, dtype=torch.int64, device=dev)
    slots = torch.full((B,), -1, dtype=torch.int64, device=dev)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        _step(q, k, v, data, scales, tables, ctx, slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(q, k, v, data, scales, tables, ctx, slots)

    ref_data = data.clone()
    ref_scales = None if scales is None else scales.clone()
    for step in range(3):
        live = B - 2 * step  # the rest is padding: slot -1, ctx 0
        lens = torch.randint(1, MAX_PAGES * 16, (live,)).tolist()
        pages = torch.randperm(PAGES)[: MAX_PAGES * live].view(live, MAX_PAGES)
        new_tables = torch.zeros(B, MAX_PAGES, dtype=torch.int32)
        new_tables[:live] = pages.to(torch.int32)
        new_slots = torch.full((B,), -1, dtype=torch.int64)
        for i, n in enumerate(lens):
            new_slots[i] = pages[i, (n - 1) // 16] * 16 + (n - 1) % 16
        new_ctx = torch.zeros(B, dtype=torch.int64)
        new_ctx[:live] = torch.tensor(lens)
        for buf, val in ((tables, new_tables), (slots, new_slots), (ctx, new_ctx)):
            buf.copy_(val)
        for buf in (q, k, v):
            buf.copy_(torch.randn(buf.shape))
        graph.replay()
        torch.cuda.synchronize()

        store_kv_reference(k, v, ref_data, ref_scales, slots)
        assert torch.equal(data, ref_data)
        if scales is not None:
            assert torch.equal(scales, ref_scales)
        ref = decode_attention_reference(q[:live], data, scales, tables[:live], ctx[:live])
        torch.testing.assert_close(out[:live], ref, rtol=3e-2, atol=3e-2)
        assert torch.equal(out[live:], torch.zeros_like(out[live:]))
