"""kernels.activation.silu_and_mul against its torch reference."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.activation import silu_and_mul, silu_and_mul_reference  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# 16-bit: the kernel rounds once, torch twice (after silu, after the product): ~1 ulp apart
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _check(shape, dtype, device):
    x = (3 * torch.randn(shape, device=device)).to(dtype)
    out = silu_and_mul(x)
    ref = silu_and_mul_reference(x)
    assert out.shape == ref.shape and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(1, 16), (7, 96), (4, 3, 200), (2, 6000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_reference(shape, dtype, device):
    _check(shape, dtype, device)


def test_silu_and_mul_strided_rows(device):
    x = torch.randn(5, 300, device=device)[:, :256]  # row stride 300
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), rtol=1e-4, atol=1e-5)


def test_silu_and_mul_rejects_odd_width(device):
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(3, 7, device=device))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("shape", [(1, 2 * 11008), (300, 2 * 14336), (64, 2 * 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_gpu(shape, dtype):
    _check(shape, dtype, "cuda")
