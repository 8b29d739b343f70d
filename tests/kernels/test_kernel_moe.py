"""kernels.moe.moe_route against its torch reference (what HF's MoE routers compute)."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.moe import (  # noqa: E402
    moe_gather_sum,
    moe_gather_sum_reference,
    moe_pack_rows,
    moe_pack_rows_reference,
    moe_route,
    moe_route_reference,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _check(t, e, k, renorm, dtype, device):
    logits = (2 * torch.randn(t, e, device=device)).to(dtype)
    w, ids = moe_route(logits, k, renorm)
    rw, rids = moe_route_reference(logits, k, renorm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (t, k)
    if dtype == torch.float32:
        assert torch.equal(ids, rids)
    else:  # 16-bit logits tie often; any of the tied experts is a right answer
        probs = torch.softmax(logits.float(), -1)
        torch.testing.assert_close(probs.gather(1, ids.long()), probs.gather(1, rids.long()))
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    if renorm:
        torch.testing.assert_close(w.sum(-1), torch.ones(t, device=device))


@pytest.mark.parametrize("t,e,k", [(1, 4, 1), (5, 8, 2), (9, 60, 6), (3, 128, 8)])
@pytest.mark.parametrize("renorm", [True, False])
def test_moe_route_matches_reference(t, e, k, renorm, device):
    _check(t, e, k, renorm, torch.float32, device)


def test_moe_route_ties_pick_lower_expert(device):
    logits = torch.zeros(2, 8, device=device)
    logits[1, 5] = 1.0
    w, ids = moe_route(logits, 3, True)
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[1].tolist() == [5, 0, 1]
    torch.testing.assert_close(w[0], torch.full((3,), 1 / 3, device=device))


def test_moe_route_empty_batch(device):
    w, ids = moe_route(torch.randn(0, 16, device=device), 4, False)
    assert w.shape == (0, 4) and ids.shape == (0, 4)


def test_moe_route_rejects_bad_top_k(device):
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.randn(2, 4, device=device), 5, True)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("t,e,k", [(4096, 128, 8), (333, 64, 8), (1000, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_route_gpu(t, e, k, dtype):
    _check(t, e, k, True, dtype, "cuda")


def _gather_case(n, m, slots, hidden, dtype, device, weighted):
    src = torch.randn(n, hidden, device=device).to(dtype)
    pos = torch.randint(-1, n, (m, slots), device=device, dtype=torch.int32)
    pos[0] = -1  # a row with nothing to sum
    w = torch.rand(m, slots, device=device) if weighted else None
    return src, pos, w


@pytest.mark.parametrize("n,m,slots,hidden", [(5, 3, 1, 16), (40, 17, 8, 96), (9, 12, 2, 1500)])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_gather_sum_matches_reference(n, m, slots, hidden, weighted, dtype, device):
    src, pos, w = _gather_case(n, m, slots, hidden, dtype, device, weighted)
    out = moe_gather_sum(src, pos, w)
    assert out.dtype == dtype and out.shape == (m, hidden)
    assert not out[0].any()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, moe_gather_sum_reference(src, pos, w), rtol=tol, atol=tol)


def test_moe_gather_sum_rejects_bad_weights(device):
    src, pos, _ = _gather_case(4, 2, 2, 8, torch.float32, device, False)
    with pytest.raises(ValueError, match="weights"):
        moe_gather_sum(src, pos, torch.rand(2, 3, device=device))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("n,m,slots", [(131072, 32768, 8), (32768, 16384, 2)])
def test_moe_gather_sum_gpu(n, m, slots):
    src, pos, w = _gather_case(n, m, slots, 4096, torch.bfloat16, "cuda", slots == 8)
    torch.testing.assert_close(moe_gather_sum(src, pos, w), moe_gather_sum_reference(src, pos, w),
                               rtol=2e-2, atol=2e-2)


def _pack_case(t, n, hidden, k, dtype, device):
    """x [t, hidden]; n rows of tokens (repeats allowed); fp32 metadata [n, 2k] seen as dtype."""
    x = torch.randn(t, hidden, device=device).to(dtype)
    token = torch.randint(0, t, (n,), device=device)
    ids = torch.randint(-1, 64, (n, k), device=device).float()
    w = torch.rand(n, k, device=device)
    w[:, 0] = float("nan")  # metadata words whose halves are NaN/odd bit patterns must pass unchanged
    meta = torch.cat([ids, w], dim=1)
    return x, token, meta, meta.view(dtype)


@pytest.mark.parametrize("t,n,hidden,k", [(1, 1, 8, 1), (7, 20, 96, 2), (5, 9, 1500, 8), (3, 0, 16, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moe_pack_rows_copies_rows_and_metadata_bits(t, n, hidden, k, dtype, device):
    x, token, meta, mv = _pack_case(t, n, hidden, k, dtype, device)
    out = moe_pack_rows(x, token, mv)
    assert out.dtype == dtype and out.shape == (n, hidden + mv.shape[1])
    ref = moe_pack_rows_reference(x, token, mv)
    bits = {4: torch.int32, 2: torch.int16}[x.element_size()]
    assert torch.equal(out.view(bits), ref.view(bits))
    assert torch.equal(out[:, :hidden].view(bits), x.view(bits)[token])
    back = out[:, hidden:].contiguous().view(torch.float32)
    assert torch.equal(back.view(torch.int32), meta.view(torch.int32))  # NaNs included, bit for bit


def test_moe_pack_rows_rejects_mismatched_metadata(device):
    x, token, meta, _ = _pack_case(4, 3, 8, 2, torch.bfloat16, device)
    with pytest.raises(ValueError, match="element"):
        moe_pack_rows(x, token, meta)  # float32 metadata beside bf16 rows: must be viewed first
    with pytest.raises(ValueError, match="token"):
        moe_pack_rows(x, token.float(), meta.view(torch.bfloat16))


@pytest.mark.gpu
@CUDA
def test_moe_pack_rows_gpu():
    x, token, meta, mv = _pack_case(16384, 32768, 4096, 8, torch.bfloat16, "cuda")
    assert torch.equal(moe_pack_rows(x, token, mv).view(torch.int16),
                       moe_pack_rows_reference(x, token, mv).view(torch.int16))
