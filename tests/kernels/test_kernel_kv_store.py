"""kernels.kv_store: exact int8 quantize-on-write, float stores, padding slots, fused rotary."""

import pytest
import torch

pytest.importorskip("triton")

from engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from engine.layers import RotaryEmbedding  # noqa: E402
from kernels.kv_store import (  # noqa: E402
    quantize_int8_reference,
    rotary_store_kv,
    rotary_store_kv_reference,
    store_kv,
    store_kv_reference,
)
from kernels.rotary import apply_rotary  # noqa: E402

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


# ---- rotary_store_kv: rotary folded into the store ----


def _rotary_case(t, h, hkv, d, in_dtype, kv_dtype, device, num_pages=4, pad_every=0):
    """Inputs of one fused call: positions out of order, slot -1 every pad_every tokens."""
    max_pos = max(256, t)
    rope = RotaryEmbedding(d, max_pos, theta=10000.0, scaling=None).to(device)
    positions = torch.randperm(max_pos, device=device)[:t]
    q = torch.randn(t, h, d, device=device).to(in_dtype)
    k = (4 * torch.randn(t, hkv, d, device=device)).to(in_dtype)
    v = torch.randn(t, hkv, d, device=device).to(in_dtype)
    slots = torch.randperm(num_pages * 16, device=device)[:t]
    if pad_every:
        slots[::pad_every] = -1
    data, scales = _empty_layer(num_pages, hkv, d, kv_dtype, device)
    return positions, q, k, v, rope.cos, rope.sin, data, scales, slots


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _run_fused(args):
    """-> the fused call's args after it ran, asserting k and v came back untouched."""
    positions, q, k, v, cos, sin, data, scales, slots = args
    k0, v0 = k.clone(), v.clone()
    rotary_store_kv(*args)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    return args


def _run_unfused(args):
    """apply_rotary in place, then store_kv: the two launches the fused op replaces."""
    positions, q, k, v, cos, sin, data, scales, slots = args
    apply_rotary(positions, q, k, cos, sin, inplace=True)
    store_kv(k, v, data, scales, slots)
    return args


def _run_reference(args):
    rotary_store_kv_reference(*args)
    return args


def _assert_same(got, want):
    """q, data_layer and scales_layer bit-identical."""
    assert torch.equal(got[1], want[1]), "q"
    assert torch.equal(got[6], want[6]), "data_layer"
    if got[7] is not None:
        assert torch.equal(got[7], want[7]), "scales_layer"


def _assert_close(got, want, rtol):
    """q and scales within rtol, int8 codes at most 1 apart, float caches within a bf16 ulp."""
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=1e-5)
    if got[7] is None:
        torch.testing.assert_close(got[6], want[6], rtol=2.0**-7, atol=1e-5)
        return
    assert (got[6].int() - want[6].int()).abs().max() <= 1
    torch.testing.assert_close(got[7], want[7], rtol=rtol, atol=0.0)


def _assert_matches_reference(got, want):
    """fp32 inputs against the torch reference: bit-exact under the interpreter. A GPU
    kernel may contract a multiply and an add into one fma (one rounding where torch has
    two), so there the rotated values may move by an ulp and an int8 code by one."""
    if got[1].device.type == "cpu":
        _assert_same(got, want)
    else:
        _assert_close(got, want, rtol=1e-5)


GQA_SHAPES = [  # (T, H, Hkv, D): H / Hkv = 1, 3, 4, 8; D = 24 has a half (12) off a power of 2
    (1, 1, 1, 16),
    (7, 3, 1, 16),
    (9, 8, 2, 64),
    (5, 8, 1, 64),
    (6, 4, 4, 16),
    (4, 6, 2, 24),
]


@pytest.mark.parametrize("t,h,hkv,d", GQA_SHAPES)
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float32, torch.float16])
def test_rotary_store_kv_matches_reference(t, h, hkv, d, kv_dtype, device):
    """fp32 inputs: q, the cache and its scales as the torch reference (bf16 is left to the
    tests below: the interpreter rounds fp32 -> bf16 differently)."""
    args = _rotary_case(t, h, hkv, d, torch.float32, kv_dtype, device, pad_every=3)
    want = _run_reference(_clone(args))
    _assert_matches_reference(_run_fused(args), want)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float32])
def test_rotary_store_kv_q_heads_split_over_kv_head_blocks(kv_dtype, device):
    """24 kv heads of 256 are two kv-head blocks of one token's programs: q's 72 heads are
    then shared out 36 / 36 between them, each head rotated by exactly one program."""
    args = _rotary_case(3, 72, 24, 256, torch.float32, kv_dtype, device, pad_every=2)
    want = _run_reference(_clone(args))
    _assert_matches_reference(_run_fused(args), want)


@pytest.mark.parametrize("t,h,hkv,d", GQA_SHAPES)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16])
def test_rotary_store_kv_matches_unfused_kernels(t, h, hkv, d, in_dtype, kv_dtype, device):
    """Bit-identical to apply_rotary(inplace=True) + store_kv, whatever the dtypes."""
    args = _rotary_case(t, h, hkv, d, in_dtype, kv_dtype, device, pad_every=4)
    want = _run_unfused(_clone(args))
    _assert_same(_run_fused(args), want)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16])
def test_rotary_store_kv_bf16_close_to_reference(kv_dtype, device):
    """bf16 inputs against the torch reference: within one rounding of the rotated values.

    Not bit-exact on CPU: Triton's interpreter rounds fp32 -> bf16 toward zero where torch
    rounds to nearest even (the unfused kernels do the same; the test above pins that).
    """
    args = _rotary_case(9, 8, 2, 64, torch.bfloat16, kv_dtype, device, pad_every=3)
    want = _run_reference(_clone(args))
    _assert_close(_run_fused(args), want, rtol=2.0**-7)  # bf16: one ulp <= 2**-7 relative


def test_rotary_store_kv_padding_rotates_q_only(device):
    """Every slot -1 (a padded CUDA-graph batch): the cache stays as it was, q is rotated."""
    args = _rotary_case(5, 4, 2, 16, torch.float32, torch.int8, device)
    args[8].fill_(-1)
    before = _clone(args)
    want = _run_reference(_clone(args))
    got = _run_fused(args)
    assert torch.equal(got[6], before[6]) and torch.equal(got[7], before[7])
    assert not torch.equal(got[1], before[1])
    _assert_matches_reference(got, want)


def test_rotary_store_kv_on_fused_qkv_views(device):
    """q, k, v as views into one [T, (H + 2 Hkv) D] projection, as the decoder passes them."""
    t, h, hkv, d = 6, 8, 2, 16
    positions, _, _, _, cos, sin, data, scales, slots = _rotary_case(
        t, h, hkv, d, torch.float32, torch.int8, device
    )
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=device)
    before = qkv.clone()
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d)
    args = [positions, q, k, v, cos, sin, data, scales, slots]
    want = _run_reference([positions, q.clone(), k.clone(), v.clone(), *_clone(args[4:])])
    _run_fused(args)
    _assert_matches_reference(args, want)
    assert torch.equal(qkv[:, h * d :], before[:, h * d :])  # k, v untouched


def test_rotary_store_kv_empty_batch(device):
    args = _rotary_case(0, 4, 2, 16, torch.float32, torch.int8, device)
    before = _clone(args)
    _assert_same(_run_fused(args), before)


def test_rotary_store_kv_rejects_bad_inputs(device):
    positions, q, k, v, cos, sin, data, scales, slots = _rotary_case(
        4, 4, 2, 16, torch.float32, torch.int8, device
    )

    def call(**changes):
        args = dict(positions=positions, q=q, k=k, v=v, cos=cos, sin=sin, data_layer=data,
                    scales_layer=scales, slots=slots)  # fmt: skip
        rotary_store_kv(**{**args, **changes})

    cases = [
        ({"positions": positions[:3]}, "positions must be"),
        ({"positions": positions.float()}, "positions must be int32 or int64"),
        ({"q": q[:3]}, "share T and D"),
        ({"q": q.int()}, "q must be float32"),
        ({"cos": cos[:, :8]}, "cos must be"),
        ({"q": q[..., :15], "k": k[..., :15], "v": v[..., :15]}, "head_dim must be even"),
        ({"v": v[:, :1]}, "k, v must both be"),
        ({"data_layer": data[:, :, :, :1]}, "data_layer must be"),
        ({"scales_layer": None}, "needs scales_layer"),
        ({"slots": slots[:3]}, "slots must be"),
        ({"q": q.transpose(1, 2)}, "contiguous in its last dimension"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=f"rotary_store_kv: .*{message}"):
            call(**changes)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("t,hkv,d", [(1, 8, 128), (2048, 8, 128), (300, 4, 64), (64, 1, 96)])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_store_kv_gpu(t, hkv, d, kv_dtype, in_dtype):
    _check(t, hkv, d, 256, kv_dtype, in_dtype, "cuda", pad_every=7)


GPU_SHAPES = [(1, 32, 8, 128), (2048, 32, 8, 128), (300, 28, 4, 64), (64, 8, 1, 96)]


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("t,h,hkv,d", GPU_SHAPES)
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_rotary_store_kv_gpu(t, h, hkv, d, kv_dtype, in_dtype):
    """Bit-identical to the unfused kernels on the GPU, and close to the torch reference
    (the kernels' fp32 math may fuse multiply-adds that torch rounds twice)."""
    args = _rotary_case(t, h, hkv, d, in_dtype, kv_dtype, "cuda", num_pages=256, pad_every=7)
    unfused, ref = _run_unfused(_clone(args)), _run_reference(_clone(args))
    got = _run_fused(args)
    _assert_same(got, unfused)
    _assert_close(got, ref, rtol=2.0**-7 if in_dtype == torch.bfloat16 else 1e-5)
