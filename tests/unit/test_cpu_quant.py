"""Packed GGUF blocks on CPU (kernels/cpu_quant.py): exact packing, the C kernel's products,
and the engine decoding from them with the dense path's tokens."""

import os
import shutil

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from torch import nn

from engine.layers import CPULinear, transpose_linears
from kernels import cpu_quant

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
    p = cpu_quant.pack(w)
    assert p is not None and p.kind == kind and (p.n, p.k) == (40, 96)
    assert torch.equal(p.dequantize(), w)
    assert p.nbytes < w.numel() * 4 / 3.5  # 5 or 9 bits a weight (fp32 scales), not 32


def test_pack_refuses_what_it_cannot_rebuild_exactly():
    assert cpu_quant.pack(torch.randn(8, 64)) is None  # plain fp32 weights
    assert cpu_quant.pack(gguf_weights(8, 64, QT.Q4_1)[:, :48].contiguous()) is None  # K % 32
    assert cpu_quant.pack(gguf_weights(8, 64, QT.Q4_1).double()) is None
    w = gguf_weights(400, 64, QT.Q4_1)
    w[300, 5] += 1e-3  # one weight off the grid, past the sample pack() looks at first
    assert cpu_quant.pack(w) is None


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0], ids=["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_packed_matmul_equals_the_dense_product(qtype, rows, scalar):
    w = gguf_weights(37, 160, qtype, seed=rows)
    p = cpu_quant.pack(w)
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
    p = cpu_quant.pack(gguf_weights(8, 64, QT.Q8_0))
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
    real = cpu_quant.PackedWeight.matmul
    monkeypatch.setattr(cpu_quant.PackedWeight, "matmul", lambda self, x: calls.append(x.shape) or real(self, x))
    for rows in (1, CPULinear.PACKED_MAX_ROWS, CPULinear.PACKED_MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias, rtol=1e-5, atol=1e-5)
    assert [s[0] for s in calls] == [1, CPULinear.PACKED_MAX_ROWS]  # the long input went dense
    transpose_linears(model, pack=False)  # a later engine that wants dense matmuls gets them
    assert layer.packed is None


def test_smollm2_engine_decodes_from_packed_blocks_with_the_dense_tokens(smollm2):
    from engine.llm import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    prompts = [smollm2.tokenizer.encode(t) for t in ("The capital of France is", "def fib(n):")]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    out = {}
    for packed in (True, False):
        eng = LLMEngine(smollm2, EngineConfig(num_pages=64, cpu_packed_weights=packed))
        layers = [m for m in smollm2.model.modules() if isinstance(m, CPULinear)]
        # every GGUF linear (q/k/v, o, gate/up, down in 30 layers; the Q8_0 head) or none
        assert len(layers) == 121
        assert sum(m.packed is not None for m in layers) == (121 if packed else 0)
        out[packed] = [c.token_ids for c in eng.generate(prompts, params)]
    assert out[True] == out[False]
    transpose_linears(smollm2.model, pack=True)  # leave the shared model as the default engine has it
