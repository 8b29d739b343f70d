"""The CPU engine's C kernels (kernels/cpu.py): exact packing of GGUF blocks, the packed
matmul's products, the element-wise ops against the torch reference, and the engine
decoding through all of them with the plain torch path's tokens."""

import os
import shutil

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from torch import nn

from engine.layers import TORCH_OPS, CPULinear, CPUOps, transpose_linears
from kernels import cpu as cpu_kernels

# With a compiler the kernel must build: a failed build fails these tests, it is not a skip.
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def gguf_weights(n: int, k: int, qtype, seed: int = 0) -> torch.Tensor:
    """What a GGUF of this type dequantizes to, by gguf's own quantizer and dequantizer."""
    w = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32) * 0.05
    w[0, :32] = 0.25  # a block of equal values (step 0)
    w[1, 32:64] = 0.0
    return torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(n, k).copy())


@pytest.mark.parametrize("qtype,kind", [(QT.Q4_1, "q4_1"), (QT.Q8_0, "q8_0")])
def test_pack_finds_the_gguf_blocks_and_rebuilds_every_weight_bit_for_bit(qtype, kind):
    w = gguf_weights(40, 96, qtype)
    p = cpu_kernels.pack(w)
    assert p is not None and p.kind == kind and (p.n, p.k) == (40, 96)
    assert torch.equal(p.dequantize(), w)
    assert p.nbytes < w.numel() * 4 / 3.5  # 6 or 9 bits a weight (fp32 scales), not 32


def test_pack_refuses_what_it_cannot_rebuild_exactly():
    assert cpu_kernels.pack(torch.randn(8, 64)) is None  # plain fp32 weights
    assert cpu_kernels.pack(gguf_weights(8, 64, QT.Q4_1)[:, :48].contiguous()) is None  # K % 32
    assert cpu_kernels.pack(gguf_weights(8, 64, QT.Q4_1).double()) is None
    w = gguf_weights(400, 64, QT.Q4_1)
    w[300, 5] += 1e-3  # one weight off the grid, past the sample pack() looks at first
    assert cpu_kernels.pack(w) is None


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0], ids=["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_packed_matmul_equals_the_dense_product(qtype, rows, scalar):
    w = gguf_weights(37, 160, qtype, seed=rows)
    p = cpu_kernels.pack(w)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows))
    want = (x.double() @ w.double().t()).float()
    got = p.matmul(x, scalar=scalar)
    assert got.shape == (rows, 37)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # leading dims and a non-contiguous input
    x3 = torch.randn(2, 160, 3).transpose(1, 2)
    torch.testing.assert_close(p.matmul(x3, scalar=scalar), (x3.double() @ w.double().t()).float(),
                               rtol=1e-5, atol=1e-5)


def test_packed_matmul_rejects_bad_input():
    p = cpu_kernels.pack(gguf_weights(8, 64, QT.Q8_0))
    with pytest.raises(ValueError, match="fp32 CPU input"):
        p.matmul(torch.randn(2, 32))
    with pytest.raises(ValueError, match="fp32 CPU input"):
        p.matmul(torch.randn(2, 64, dtype=torch.float64))


def test_cpu_linear_uses_the_packed_blocks_for_short_inputs_only(monkeypatch):
    linear = nn.Linear(64, 24, bias=True)
    with torch.no_grad():
        linear.weight.copy_(gguf_weights(24, 64, QT.Q4_1))
    model = nn.Sequential(linear)
    assert transpose_linears(model, pack=True) == 1
    layer = model[0]
    assert isinstance(layer, CPULinear) and layer.packed is not None
    calls = []
    real = cpu_kernels.PackedWeight.matmul
    monkeypatch.setattr(cpu_kernels.PackedWeight, "matmul", lambda self, x: calls.append(x.shape) or real(self, x))
    for rows in (1, CPULinear.PACKED_MAX_ROWS, CPULinear.PACKED_MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias, rtol=1e-5, atol=1e-5)
    assert [s[0] for s in calls] == [1, CPULinear.PACKED_MAX_ROWS]  # the long input went dense
    transpose_linears(model, pack=False)  # a later engine that wants dense matmuls gets them
    assert layer.packed is None


def test_elementwise_ops_match_the_torch_reference():
    ops, gen = CPUOps(), torch.Generator().manual_seed(0)
    for rows in (1, 3, 37):
        x, res = torch.randn(rows, 576, generator=gen), torch.randn(rows, 576, generator=gen)
        w = torch.randn(576, generator=gen)
        torch.testing.assert_close(ops.rmsnorm(x, w, 1e-5), TORCH_OPS.rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
        got, got_res = ops.add_rmsnorm(x, res, w, 1e-5)
        want, want_res = TORCH_OPS.add_rmsnorm(x, res, w, 1e-5)
        assert torch.equal(got_res, want_res)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        g = torch.randn(rows, 2 * 96, generator=gen) * 4
        torch.testing.assert_close(ops.silu_and_mul(g), TORCH_OPS.silu_and_mul(g), rtol=2e-6, atol=1e-6)
    g = torch.randn(64, 2 * 1024, generator=gen)  # big enough for the threaded branch
    torch.testing.assert_close(ops.silu_and_mul(g), TORCH_OPS.silu_and_mul(g), rtol=2e-6, atol=1e-6)
    x = torch.randn(64, 576, generator=gen)
    torch.testing.assert_close(ops.rmsnorm(x, w, 1e-5), TORCH_OPS.rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6)


def test_rotary_rotates_the_fused_qkv_views_in_place_bit_for_bit():
    t, h, hkv, d = 5, 9, 3, 64
    gen = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(100, d, generator=gen), torch.randn(100, d, generator=gen)
    pos = torch.tensor([0, 7, 99, 3, 3])
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d)
    want_q, want_k = TORCH_OPS.rotary(pos, q, k, cos, sin)
    v_before = v.clone()
    got_q, got_k = CPUOps().rotary(pos, q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(v, v_before)  # the rest of the fused row untouched


def test_cpu_ops_fall_back_to_torch_for_what_the_kernels_do_not_take():
    ops = CPUOps()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(ops.rmsnorm(x, w, 1e-6), TORCH_OPS.rmsnorm(x, w, 1e-6))
    xt = torch.randn(64, 4).t()  # not contiguous
    assert torch.equal(ops.silu_and_mul(xt), TORCH_OPS.silu_and_mul(xt))
    q, k = torch.randn(2, 4, 16).transpose(0, 1), torch.randn(4, 2, 16)  # heads not contiguous
    cs = torch.randn(8, 16)
    got, want = ops.rotary(torch.tensor([1, 2, 3, 4]), q, k, cs, cs), TORCH_OPS.rotary(
        torch.tensor([1, 2, 3, 4]), q, k, cs, cs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8], ids=["fp32", "int8"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 20)])
def test_c_decode_attention_matches_the_torch_reference(kv_dtype, heads, kv_heads, head_dim):
    from engine.attention import AttentionMetadata, CPUAttention, TorchAttention
    from engine.kv_cache import KVCache, KVCacheSpec

    gen = torch.Generator().manual_seed(heads * head_dim)
    ctx = [1, 17, 40, 5]  # not multiples of the page size; pages scattered, tables ragged
    pages = torch.randperm(32, generator=gen)
    tables, used = [], 0
    for n in ctx:
        need = (n + 15) // 16
        tables.append(pages[used : used + need].tolist() + [0] * (3 - need))
        used += need
    outs = []
    for attn in (TorchAttention(), CPUAttention()):
        cache = KVCache(KVCacheSpec(2, 32, kv_heads, head_dim, kv_dtype))
        g2 = torch.Generator().manual_seed(7)
        for layer in range(2):  # fill every used slot through store(), as prefill would
            slots = torch.tensor([tables[b][t // 16] * 16 + t % 16 for b, n in enumerate(ctx) for t in range(n)])
            k = torch.randn(len(slots), kv_heads, head_dim, generator=g2)
            cache.store(layer, k, torch.randn(len(slots), kv_heads, head_dim, generator=g2), slots)
        q = torch.randn(4, heads, head_dim, generator=g2)
        k_new = torch.randn(4, kv_heads, head_dim, generator=g2)
        v_new = torch.randn(4, kv_heads, head_dim, generator=g2)
        last = torch.tensor([tables[b][(n - 1) // 16] * 16 + (n - 1) % 16 for b, n in enumerate(ctx)])
        meta = AttentionMetadata([1] * 4, ctx, torch.tensor(tables), last, torch.tensor(ctx))
        outs.append(attn.forward(q, k_new, v_new, cache, 1, meta))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_c_decode_attention_leaves_what_it_cannot_index_safely_to_torch():
    from engine.attention import AttentionMetadata, CPUAttention
    from engine.kv_cache import KVCache, KVCacheSpec
    from kernels import cpu

    q = torch.randn(2, 4, 16)
    data = torch.zeros(2, 8, 16, 2, 16)
    tables, ctx = torch.tensor([[0, 1], [2, 3]]), torch.tensor([17, 32])
    assert cpu.decode_attention_fits(q, data, None, tables, ctx)
    assert cpu.decode_attention_bounds(tables, ctx, 8) == 32
    assert cpu.decode_attention_bounds(tables, torch.tensor([17, 33]), 8) is None  # past the table
    assert cpu.decode_attention_bounds(tables, torch.tensor([0, 5]), 8) is None  # empty context
    assert cpu.decode_attention_bounds(torch.tensor([[0, 1], [2, 8]]), ctx, 8) is None  # no page 8
    assert not cpu.decode_attention_fits(q, torch.zeros(2, 8, 32, 2, 16), None, tables, ctx)  # page 32
    assert not cpu.decode_attention_fits(q, data, None, tables[:1], ctx)  # rows differ
    assert not cpu.decode_attention_fits(q, data.to(torch.int8), None, tables, ctx)  # no scales
    # through the backend: a table whose page ids the cache lacks falls back to the torch path
    cache = KVCache(KVCacheSpec(1, 4, 2, 16, torch.float32))
    meta = AttentionMetadata([1], [3], torch.tensor([[9]]), torch.tensor([2]), torch.tensor([3]))
    with pytest.raises(IndexError):  # what the torch reference does with page 9 of 4
        CPUAttention().forward(torch.randn(1, 4, 16), torch.randn(1, 2, 16), torch.randn(1, 2, 16),
                               cache, 0, meta)


def test_smollm2_engine_through_the_c_kernels_gives_the_torch_path_tokens(smollm2):
    from engine.llm import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    prompts = [smollm2.tokenizer.encode(t) for t in ("The capital of France is", "def fib(n):")]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    out = {}
    for fast in (True, False):
        eng = LLMEngine(smollm2, EngineConfig(num_pages=64, cpu_packed_weights=fast, cpu_kernels=fast))
        assert isinstance(eng.backend.ops, CPUOps) == fast
        layers = [m for m in smollm2.model.modules() if isinstance(m, CPULinear)]
        # every GGUF linear (q/k/v, o, gate/up, down in 30 layers; the Q8_0 head) or none
        assert len(layers) == 121
        assert sum(m.packed is not None for m in layers) == (121 if fast else 0)
        out[fast] = [c.token_ids for c in eng.generate(prompts, params)]
    assert out[True] == out[False]
    transpose_linears(smollm2.model, pack=True)  # leave the shared model as the default engine has it


@pytest.mark.parametrize("env", [{"MINIINFER_CPU_KERNELS": "0"}, {"CC": "false"}], ids=["off", "cc-fails"])
def test_without_the_kernels_the_engine_takes_the_torch_path(monkeypatch, tmp_path, caplog, env):
    from engine.backend import select_backend

    monkeypatch.setattr(cpu_kernels, "_libs", {})  # forget the build this process loaded
    monkeypatch.setenv("MINIINFER_CACHE", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not cpu_kernels.available()
    backend = select_backend("cpu", cpu_kernels=True)
    assert backend.ops is TORCH_OPS and type(backend.attn).__name__ == "TorchAttention"
    model = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight.copy_(gguf_weights(8, 64, QT.Q8_0))
    transpose_linears(model, pack=True)
    assert model[0].packed is None  # dense, and still right
    if "CC" in env:
        assert "CPU kernels off" in caplog.text and "false failed" in caplog.text
