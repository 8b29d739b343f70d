"""kernels.rotary against its torch reference and engine.layers.RotaryEmbedding."""

import pytest
import torch

pytest.importorskip("triton")

from engine.layers import RotaryEmbedding  # noqa: E402
from kernels.rotary import apply_rotary, apply_rotary_reference  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _tables(head_dim, max_pos, device):
    rope = RotaryEmbedding(head_dim, max_pos, theta=10000.0, scaling=None).to(device)
    return rope, rope.cos, rope.sin


def _check(t, h, hkv, d, dtype, device, inplace, pos_dtype=torch.int64):
    _, cos, sin = _tables(d, 256, device)
    positions = torch.randint(0, 256, (t,), device=device, dtype=pos_dtype)
    q = torch.randn(t, h, d, device=device).to(dtype)
    k = torch.randn(t, hkv, d, device=device).to(dtype)
    ref_q, ref_k = apply_rotary_reference(positions, q, k, cos, sin)
    out_q, out_k = apply_rotary(positions, q, k, cos, sin, inplace=inplace)
    if inplace:
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out_q, ref_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_k, ref_k, rtol=rtol, atol=atol)


@pytest.mark.parametrize("t,h,hkv,d", [(1, 1, 1, 8), (6, 4, 2, 32), (5, 12, 4, 64), (3, 6, 2, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_matches_reference(t, h, hkv, d, dtype, inplace, device):
    _check(t, h, hkv, d, dtype, device, inplace)


def test_rotary_int32_positions(device):
    _check(4, 4, 2, 16, torch.float32, device, inplace=False, pos_dtype=torch.int32)


def test_rotary_matches_engine_module(device):
    rope, cos, sin = _tables(64, 128, device)
    positions = torch.tensor([0, 5, 127, 64], device=device)
    q, k = torch.randn(4, 9, 64, device=device), torch.randn(4, 3, 64, device=device)
    ref_q, ref_k = rope(positions, q, k)
    out_q, out_k = apply_rotary(positions, q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_k, ref_k, rtol=1e-4, atol=1e-5)


def test_rotary_in_place_on_fused_qkv_views(device):
    """q and k as views into one [T, (H + 2 Hkv) D] projection; v must stay untouched."""
    t, h, hkv, d = 5, 4, 2, 32
    _, cos, sin = _tables(d, 64, device)
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=device)
    before = qkv.clone()
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    positions = torch.arange(t, device=device)
    ref_q, ref_k = apply_rotary_reference(positions, q.clone(), k.clone(), cos, sin)
    apply_rotary(positions, q, k, cos, sin, inplace=True)
    torch.testing.assert_close(q, ref_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k, ref_k, rtol=1e-4, atol=1e-5)
    assert torch.equal(qkv[:, (h + hkv) * d :], before[:, (h + hkv) * d :])


def test_rotary_rejects_bad_inputs(device):
    _, cos, sin = _tables(16, 32, device)
    q, k = torch.randn(3, 2, 16, device=device), torch.randn(3, 1, 16, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="positions must be"):
        apply_rotary(pos[:2], q, k, cos, sin)
    with pytest.raises(ValueError, match="int32 or int64"):
        apply_rotary(pos.float(), q, k, cos, sin)
    with pytest.raises(ValueError, match="share T and D"):
        apply_rotary(pos, q, torch.randn(3, 1, 8, device=device), cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rotary(pos, q, k, cos[:, :8], sin)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("t,h,hkv,d", [(1, 32, 8, 128), (517, 32, 8, 128), (64, 28, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_gpu(t, h, hkv, d, dtype, inplace):
    _check(t, h, hkv, d, dtype, "cuda", inplace)
