"""kernels.kv_store: exact int8 quantize-on-write, float stores, padding slots."""

import pytest
import torch

pytest.importorskip("triton")

from engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from kernels.kv_store import (  # noqa: E402
    quantize_int8_reference,
    store_kv,
    store_kv_reference,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _empty_layer(num_pages, hkv, d, kv_dtype, device):
    # a sentinel fill shows which slots were written
    data = torch.full((2, num_pages, 16, hkv, d), 7, dtype=kv_dtype, device=device)
    scales = None
    if kv_dtype == torch.int8:
        scales = torch.full((2, num_pages, 16, hkv), -1.0, device=device)
    return data, scales


def _check(t, hkv, d, num_pages, kv_dtype, in_dtype, device, pad_every=0):
    k = (4 * torch.randn(t, hkv, d, device=device)).to(in_dtype)
    v = torch.randn(t, hkv, d, device=device).to(in_dtype)
    slots = torch.randperm(num_pages * 16, device=device)[:t]
    if pad_every:
        slots[::pad_every] = -1  # CUDA-graph padding: skipped
    data, scales = _empty_layer(num_pages, hkv, d, kv_dtype, device)
    ref_data, ref_scales = data.clone(), None if scales is None else scales.clone()
    store_kv(k, v, data, scales, slots)
    store_kv_reference(k, v, ref_data, ref_scales, slots)
    assert torch.equal(data, ref_data)  # int8 values bit-exact; float stores exact casts
    if scales is not None:
        assert torch.equal(scales, ref_scales)


@pytest.mark.parametrize("t,hkv,d", [(1, 1, 16), (9, 3, 24), (20, 4, 64), (33, 2, 128)])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float32, torch.float16])
def test_store_kv_matches_reference(t, hkv, d, kv_dtype, device):
    _check(t, hkv, d, 4, kv_dtype, torch.float32, device)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float32])
def test_store_kv_skips_negative_slots(kv_dtype, device):
    _check(17, 2, 32, 3, kv_dtype, torch.float32, device, pad_every=3)


def test_store_kv_fp16_input_int8_cache(device):
    _check(12, 2, 32, 2, torch.int8, torch.float16, device)


def test_int8_rounding_ties_go_to_even(device):
    """scale = 1 exactly (max |x| = 127), so x / scale hits .5 ties: torch.round rounds to even."""
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.49, 0.0, -127.0, 3.5])
    k = row.repeat(2, 1, 1).to(device)  # [T=2, Hkv=1, D=12]
    v = torch.zeros_like(k)  # max |x| = 0: the 1e-8 clamp keeps the scale finite
    data, scales = _empty_layer(1, 1, 12, torch.int8, device)
    store_kv(k, v, data, scales, torch.tensor([3, 9], device=device))
    expected = torch.tensor([127, 0, 2, 2, 0, -2, -2, 126, 3, 0, -127, 4], dtype=torch.int8)
    assert torch.equal(data[0, 0, 3, 0].cpu(), expected)
    assert torch.equal(data[1, 0, 9, 0].cpu(), torch.zeros(12, dtype=torch.int8))
    assert scales[0, 0, 3, 0].item() == 1.0
    # torch's own clamp(1e-8) / 127 on this device (CUDA multiplies by fp32(1 / 127))
    assert scales[1, 0, 9, 0].item() == quantize_int8_reference(v[1])[1].item()


def test_store_kv_matches_engine_cache(device):
    spec = KVCacheSpec(num_layers=2, num_pages=4, num_kv_heads=2, head_dim=32, dtype=torch.int8)
    engine_cache, ours = KVCache(spec, device), KVCache(spec, device)
    k, v = torch.randn(10, 2, 32, device=device), torch.randn(10, 2, 32, device=device)
    slots = torch.randperm(64, device=device)[:10]
    engine_cache.store(1, k, v, slots)
    store_kv(k, v, ours.data[1], ours.scales[1], slots)
    assert torch.equal(ours.data, engine_cache.data)
    assert torch.equal(ours.scales, engine_cache.scales)


def test_store_kv_rejects_bad_inputs(device):
    k = torch.randn(4, 2, 16, device=device)
    data, scales = _empty_layer(2, 2, 16, torch.int8, device)
    slots = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="needs scales_layer"):
        store_kv(k, k, data, None, slots)
    with pytest.raises(ValueError, match="only for int8"):
        store_kv(k, k, data.float(), scales, slots)
    with pytest.raises(ValueError, match="data_layer must be"):
        store_kv(k, k, data[:, :, :, :1], scales, slots)
    with pytest.raises(ValueError, match="slots must be"):
        store_kv(k, k, data, scales, slots[:3])
    with pytest.raises(ValueError, match="int32 or int64"):
        store_kv(k, k, data, scales, slots.float())


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("t,hkv,d", [(1, 8, 128), (2048, 8, 128), (300, 4, 64), (64, 1, 96)])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_store_kv_gpu(t, hkv, d, kv_dtype, in_dtype):
    _check(t, hkv, d, 256, kv_dtype, in_dtype, "cuda", pad_every=7)
