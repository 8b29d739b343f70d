"""kernels.rmsnorm against its torch reference and engine.layers.RMSNorm."""

import pytest
import torch

pytest.importorskip("triton")

from engine.layers import RMSNorm  # noqa: E402
from kernels.rmsnorm import (  # noqa: E402
    fused_add_rmsnorm,
    fused_add_rmsnorm_reference,
    rmsnorm,
    rmsnorm_reference,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, residual, weight


def _check_fused(shape, dtype, device, eps=1e-6):
    x, residual, weight = _inputs(shape, dtype, device)
    out, new_res = fused_add_rmsnorm(x, residual, weight, eps)
    ref_out, ref_res = fused_add_rmsnorm_reference(x, residual, weight, eps)
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(new_res, ref_res)  # one rounding of x + residual, as torch
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(1, 8), (5, 96), (3, 4, 200), (4, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_matches_reference(shape, dtype, device):
    x, _, weight = _inputs(shape, dtype, device)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        rmsnorm(x, weight, 1e-5), rmsnorm_reference(x, weight, 1e-5), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("shape", [(1, 8), (5, 96), (3, 4, 200), (4, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rmsnorm_matches_reference(shape, dtype, device):
    _check_fused(shape, dtype, device)


def test_rmsnorm_matches_engine_module(device):
    norm = RMSNorm(96, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(6, 96, device=device)
    torch.testing.assert_close(
        rmsnorm(x, norm.weight.detach(), 1e-5), norm(x).detach(), rtol=1e-4, atol=1e-5
    )


def test_rmsnorm_strided_rows(device):
    big = torch.randn(6, 160, device=device)
    x = big[:, :96]  # row stride 160, last dim contiguous
    weight = torch.randn(96, device=device)
    torch.testing.assert_close(
        rmsnorm(x, weight), rmsnorm_reference(x, weight), rtol=1e-4, atol=1e-5
    )


def test_rmsnorm_empty_batch(device):
    x = torch.empty(0, 32, device=device)
    out, res = fused_add_rmsnorm(x, x.clone(), torch.ones(32, device=device))
    assert out.shape == (0, 32) and res.shape == (0, 32)


def test_rmsnorm_rejects_bad_inputs(device):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm(x, torch.ones(31, device=device))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        rmsnorm(x.to(torch.int32), torch.ones(32, device=device))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        rmsnorm(torch.randn(32, 4, device=device).t(), torch.ones(4, device=device))
    with pytest.raises(ValueError, match="residual must match"):
        fused_add_rmsnorm(x, torch.randn(4, 16, device=device), torch.ones(32, device=device))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("shape", [(1, 4096), (77, 4096), (256, 5120), (3, 8192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_add_rmsnorm_gpu(shape, dtype):
    _check_fused(shape, dtype, "cuda")
