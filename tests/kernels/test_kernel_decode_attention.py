"""kernels.decode_attention: paged split-K decode vs the torch reference and engine.attention."""

import pytest
import torch

pytest.importorskip("triton")

import kernels.decode_attention as da  # noqa: E402
from engine.attention import AttentionMetadata  # noqa: E402
from engine.attention import decode_attention as engine_decode_attention  # noqa: E402
from engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}

# (B, H, Hkv, D, ctx_lens): GQA ratios 1, 3, 4, 8; lengths off the 16-token page grid
CASES = [
    (3, 4, 4, 32, [1, 37, 128]),
    (2, 12, 4, 64, [17, 100]),
    (2, 8, 2, 16, [5, 64]),
    (2, 8, 1, 24, [33, 90]),
]


def _check(b, h, hkv, d, ctx_lens, kv_dtype, q_dtype, device, make_layer, make_block_tables, **kw):
    num_pages = kw.pop("num_pages", 24)
    max_pages = kw.pop("max_pages", max(-(-n // 16) for n in ctx_lens) + 2)
    data, scales = make_layer(num_pages, hkv, d, kv_dtype, device)
    tables = make_block_tables(ctx_lens, num_pages, max_pages, device, **kw.pop("table", {}))
    ctx = torch.tensor(ctx_lens, device=device)
    q = torch.randn(b, h, d, device=device).to(q_dtype)
    out = decode_attention(q, data, scales, tables, ctx, **kw)
    ref = decode_attention_reference(q, data, scales, tables, ctx)
    assert out.shape == q.shape and out.dtype == q_dtype
    rtol, atol = TOL[q_dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return out


@pytest.mark.parametrize("b,h,hkv,d,ctx_lens", CASES)
@pytest.mark.parametrize(
    "kv_dtype,q_dtype",
    [(torch.float32, torch.float32), (torch.int8, torch.float32), (torch.float16, torch.float16)],
)
def test_decode_split_k_matches_reference(
    b, h, hkv, d, ctx_lens, kv_dtype, q_dtype, device, make_layer, make_block_tables
):
    # 32-token partitions: up to 4 partitions per sequence, several of them empty
    _check(
        b, h, hkv, d, ctx_lens, kv_dtype, q_dtype, device, make_layer, make_block_tables,
        partition_size=32,
    )  # fmt: skip


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_decode_head_dim_in_halves_equals_whole_tiles(
    kv_dtype, device, make_layer, make_block_tables, monkeypatch
):
    """split_d (the head dim in two halves, _attend_tile_halves) and whole tiles both give
    the reference's output, GQA 3, over several partitions and tiles."""
    outs = []
    for split in (False, True):
        monkeypatch.setattr(da, "TUNING", {"block_n": 16, "num_warps": 1, "split_d": split})
        torch.manual_seed(1)  # the same inputs for both
        outs.append(_check(
            2, 6, 2, 64, [45, 100], kv_dtype, torch.float32, device, make_layer,
            make_block_tables, partition_size=32,
        ))  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_decode_single_partition(kv_dtype, device, make_layer, make_block_tables):
    _check(2, 8, 2, 32, [40, 77], kv_dtype, torch.float32, device, make_layer, make_block_tables)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_decode_table_far_wider_than_the_contexts(kv_dtype, device, make_layer, make_block_tables,
                                                  monkeypatch):
    """A graph's table is sized for its longest context: 16-token partitions, 40 pages, so
    all but a few partitions are past every context and must be neither written nor merged.
    The partials start as NaN, so merging one that was never written shows in the output."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(empty_like(*a, **k)))
    _check(
        4, 8, 2, 32, [1, 20, 32, 47], kv_dtype, torch.float32, device, make_layer, make_block_tables,
        max_pages=40, num_pages=48, partition_size=16,
    )  # fmt: skip


def test_decode_int64_tables_and_garbage_padding(device, make_layer, make_block_tables):
    """Entries past a sequence's pages are never read, even when they are invalid page ids."""
    table = {"dtype": torch.int64, "pad": 10**9}
    _check(
        3, 6, 2, 32, [3, 50, 20], torch.int8, torch.float32, device, make_layer,
        make_block_tables, table=table, max_pages=8, partition_size=48,
    )  # fmt: skip


def test_decode_zero_length_rows_give_zeros(device, make_layer, make_block_tables):
    data, scales = make_layer(4, 2, 16, torch.int8, device)
    tables = make_block_tables([20, 0], 4, 3, device)
    q = torch.randn(2, 4, 16, device=device)
    out = decode_attention(
        q, data, scales, tables, torch.tensor([20, 0], device=device), partition_size=16
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = decode_attention_reference(
        q[:1], data, scales, tables[:1], torch.tensor([20], device=device)
    )
    torch.testing.assert_close(out[:1], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_decode_matches_engine_attention(kv_dtype, device):
    spec = KVCacheSpec(num_layers=2, num_pages=12, num_kv_heads=2, head_dim=32, dtype=kv_dtype)
    cache = KVCache(spec, device)
    ctx_lens = [9, 40, 33]
    pages = torch.randperm(12).tolist()
    tables = torch.zeros(3, 3, dtype=torch.int64)
    slots = []
    for i, n in enumerate(ctx_lens):
        used = pages[: -(-n // 16)]
        pages = pages[len(used) :]
        tables[i, : len(used)] = torch.tensor(used)
        slots += [used[j // 16] * 16 + j % 16 for j in range(n)]
    slots = torch.tensor(slots, device=device)
    cache.store(
        1,
        torch.randn(len(slots), 2, 32, device=device),
        torch.randn(len(slots), 2, 32, device=device),
        slots,
    )
    meta = AttentionMetadata(
        q_lens=[1, 1, 1],
        ctx_lens=ctx_lens,
        block_tables=tables.to(device),
        slots=slots,
        ctx_lens_t=torch.tensor(ctx_lens, device=device),
    )
    q = torch.randn(3, 6, 32, device=device)
    scales = cache.scales[1] if cache.quantized else None
    out = decode_attention(
        q, cache.data[1], scales, meta.block_tables, meta.ctx_lens_t, partition_size=16
    )
    torch.testing.assert_close(
        out, engine_decode_attention(q, cache, 1, meta), rtol=1e-4, atol=1e-5
    )


def test_decode_rejects_bad_inputs(device, make_layer, make_block_tables):
    data, scales = make_layer(4, 2, 16, torch.int8, device)
    tables = make_block_tables([20], 4, 2, device)
    ctx = torch.tensor([20], device=device)
    q = torch.randn(1, 4, 16, device=device)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(torch.randn(1, 3, 16, device=device), data, scales, tables, ctx)
    with pytest.raises(ValueError, match="needs scales_layer"):
        decode_attention(q, data, None, tables, ctx)
    with pytest.raises(ValueError, match="must have B=1 rows"):
        decode_attention(q, data, scales, tables, torch.tensor([20, 3], device=device))
    with pytest.raises(ValueError, match="partition_size"):
        decode_attention(q, data, scales, tables, ctx, partition_size=24)
    with pytest.raises(ValueError, match="int32 or int64"):
        decode_attention(q, data, scales, tables.float(), ctx)
    for bad in (0.0, -0.25, float("inf"), float("nan")):  # the tiles need a positive scale
        with pytest.raises(ValueError, match="sm_scale must be a positive"):
            decode_attention(q, data, scales, tables, ctx, sm_scale=bad)


def _as_hopper(monkeypatch):
    """Launch rules in plain Python as on an H100 / H200: CUDA devices report compute
    capability 9.0 (CI runs the interpreter, where gpu_capability reports none)."""
    monkeypatch.setattr(da, "gpu_capability", lambda device: (9, 0) if device.type == "cuda" else None)


def test_decode_launch_rules_pick_the_tile_path(monkeypatch):
    """Which head dims run in halves, per device and KV dtype (plain Python: no GPU needed).
    Halves need a power-of-two head dim of 32+; on a GPU, int8 takes them only at D128 on
    its one-warp tile (three stages; whole tiles two), 16-bit pages wherever allowed."""
    _as_hopper(monkeypatch)
    assert [d for d in (16, 24, 32, 64, 80, 96, 128, 256) if da.halves_allowed(d)] == [32, 64, 128, 256]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert da._launch(cpu, 32, True, 64)["split_d"] and not da._launch(cpu, 32, True, 24)["split_d"]
    for d, want in ((128, True), (64, True), (80, False)):
        assert da._launch(gpu, 512, False, d)["split_d"] is want
    for d, partition, halves, stages in ((128, 512, True, 3), (128, 128, True, 3), (64, 512, False, 2),
                                         (256, 512, False, 2), (80, 512, False, 2), (128, 64, False, None)):
        cfg = da._launch(gpu, partition, True, d)
        assert (cfg["split_d"], cfg["num_stages"]) == (halves, stages), (d, partition, cfg)
    monkeypatch.setattr(da, "TUNING", {"block_n": 16, "num_warps": 1, "split_d": True})
    assert da._launch(gpu, 512, True, 128)["split_d"] and not da._launch(gpu, 512, True, 80)["split_d"]


def test_decode_launch_rules_pick_fast_int8(monkeypatch):
    """FAST_I8 (fp16 dots, inline-assembly conversions) may run for int8 pages under 16-bit
    queries with a power-of-two head dim, on a GPU outside the interpreter; the rules take
    it on the one-warp tiles in halves (D128) over 512-token partitions, where it was
    faster, and TUNING may take it wherever it may run. Plain Python: no GPU needed."""
    cpu, gpu, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    _as_hopper(monkeypatch)
    for partition in (512, 1024):
        assert da._launch(gpu, partition, True, 128, bf16)["fast_i8"]
        assert da._launch(gpu, partition, True, 128, torch.float16)["fast_i8"]
    assert not da._launch(gpu, 128, True, 128, bf16)["fast_i8"]  # 128-token partitions: slower
    assert not da._launch(gpu, 64, True, 128, bf16)["fast_i8"]  # four warps: slower
    assert not da._launch(gpu, 512, True, 64, bf16)["fast_i8"]  # whole D64 tiles: slower
    assert not da._launch(gpu, 512, True, 128, torch.float32)["fast_i8"]  # exact fp32 dots
    assert not da._launch(gpu, 512, False, 128, bf16)["fast_i8"]  # 16-bit pages
    assert not da._launch(cpu, 512, True, 128, bf16)["fast_i8"]
    assert [d for d in (16, 64, 80, 96, 128, 256)
            if da.fast_i8_allowed(gpu, True, bf16, d)] == [16, 64, 128, 256]  # V in words
    monkeypatch.setattr(da, "TUNING", {"block_n": 32, "num_warps": 1})
    assert not da._launch(gpu, 512, True, 128, bf16)["fast_i8"]  # absent from TUNING: off
    monkeypatch.setattr(da, "TUNING", {"block_n": 32, "num_warps": 4, "fast_i8": True})
    assert da._launch(gpu, 64, True, 64, bf16)["fast_i8"]
    assert not da._launch(gpu, 512, True, 80, bf16)["fast_i8"]
    monkeypatch.setattr(da, "TUNING", None)
    monkeypatch.setattr(da, "gpu_capability", lambda device: None)  # the interpreter: no PTX
    assert not da._launch(gpu, 512, True, 128, bf16)["fast_i8"]


@pytest.mark.parametrize("q_scale,outlier", [(1.0, False), (0.2, False), (4.0, False), (1.0, True)])
def test_decode_int8_scores_from_int8_dots(q_scale, outlier, device, make_layer, make_block_tables,
                                           monkeypatch):
    """I8_QK: the scores come from int8 dots of the pages' keys with the query split in two
    int8 parts (_i8_query). Its output matches the fp32 reference within little more than
    the conversion path's error (the split rounds the query to ~16 bits of its row's
    largest value), for flat to peaked attention over partitions, tiles and GQA 4; with
    one head of each group 30x the others (outlier), the others keep their accuracy (the
    split's scale is per row). fp16 queries: the CPU interpreter casts int8 to bf16
    wrongly; bf16 runs in the GPU tests."""
    q_dtype = torch.float16 if device == "cpu" else torch.bfloat16
    ctx_lens = [1, 45, 100]
    data, scales = make_layer(24, 2, 64, torch.int8, device)
    tables = make_block_tables(ctx_lens, 24, 8, device)
    ctx = torch.tensor(ctx_lens, device=device)
    q = torch.randn(3, 8, 64, device=device) * q_scale
    if outlier:
        q[:, ::4] *= 30.0
    q = q.to(q_dtype)
    ref = decode_attention_reference(q.float(), data, scales, tables, ctx)
    errs = {}
    for i8 in (True, False):
        monkeypatch.setattr(da, "TUNING", {"block_n": 16, "num_warps": 1, "split_d": True,
                                           "i8_qk": i8})
        assert da.launch_config(q, data, 32, True)["i8_qk"] is i8
        out = decode_attention(q, data, scales, tables, ctx, partition_size=32)
        assert out.dtype == q_dtype and torch.isfinite(out).all()
        errs[i8] = _rel_err(out, ref)
    assert errs[True] < 5e-3 and errs[True] <= 1.25 * errs[False] + 1e-4, errs


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("spread", ["tiles", "keys"])
def test_decode_lazy_running_max(kv_dtype, spread, device, make_layer, make_block_tables,
                                 monkeypatch):
    """LAZY: the running max moves only when a tile passes it by more than 2^8. With plain
    random keys ("tiles": scores a few units apart) most tiles keep a stale max; keys
    scaled by factors of 1 to 1000 ("keys") make the tiles' maxima jump past the margin
    too. Either way lazy and eager rescaling agree to fp32 rounding and give the
    reference's output (fp32 queries: exact dots; 16-bit pages fold the softmax scale in
    after the max, int8 pages before)."""
    ctx_lens = [7, 200, 333]
    data, scales = make_layer(64, 2, 64, kv_dtype, device)
    if spread == "keys":
        grow = torch.pow(10.0, torch.rand(data.shape[1:4], device=device) * 3)  # [P, S, Hkv]
        if scales is None:
            data[0] *= grow.unsqueeze(-1)
        else:
            scales[0] *= grow
    tables = make_block_tables(ctx_lens, 64, 24, device)
    ctx = torch.tensor(ctx_lens, device=device)
    q = torch.randn(3, 8, 64, device=device)
    ref = decode_attention_reference(q, data, scales, tables, ctx)
    outs = {}
    for lazy in (True, False):
        monkeypatch.setattr(da, "TUNING", {"block_n": 16, "num_warps": 1, "split_d": True,
                                           "lazy": lazy})
        assert da.launch_config(q, data, 128, kv_dtype == torch.int8)["lazy"] is lazy
        outs[lazy] = decode_attention(q, data, scales, tables, ctx, partition_size=128)
        assert torch.isfinite(outs[lazy]).all()
        assert _rel_err(outs[lazy], ref) < 1e-5
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-6)


def test_decode_launch_rules_for_int8_dots_and_lazy_max(monkeypatch):
    """I8_QK and LAZY run only where TUNING asks, on tiles in halves: I8_QK for int8 pages
    under 16-bit queries with head dims 64-256 (Triton's int8 dot needs 32+ columns a
    half on a GPU; the int32 sums are exact up to 256); LAZY not for int8 pages under
    fp16 queries without FAST_I8, whose p * v_scale could overflow fp16. Plain Python."""
    gpu, bf16, f16 = torch.device("cuda"), torch.bfloat16, torch.float16
    _as_hopper(monkeypatch)
    for partition in (64, 128, 512):
        for quantized in (True, False):
            cfg = da._launch(gpu, partition, quantized, 128, bf16)
            assert not cfg["i8_qk"] and not cfg["lazy"]  # the rules: off
    assert [d for d in (32, 64, 128, 256, 512) if da.i8_qk_allowed(True, bf16, d)] == [64, 128, 256]
    assert not da.i8_qk_allowed(True, torch.float32, 128) and not da.i8_qk_allowed(False, bf16, 128)
    monkeypatch.setattr(da, "TUNING", {"block_n": 32, "num_warps": 1, "split_d": True,
                                       "i8_qk": True, "lazy": True})
    assert da._launch(gpu, 512, True, 128, f16)["i8_qk"]
    assert not da._launch(gpu, 512, True, 32, bf16)["i8_qk"]
    assert not da._launch(gpu, 512, False, 128, bf16)["i8_qk"]
    assert da._launch(gpu, 512, True, 128, bf16)["lazy"] and da._launch(gpu, 512, False, 128, f16)["lazy"]
    assert not da._launch(gpu, 512, True, 128, f16)["lazy"]  # int8, fp16, no FAST_I8
    monkeypatch.setattr(da, "TUNING", {"block_n": 32, "num_warps": 1, "split_d": True,
                                       "fast_i8": True, "lazy": True})
    assert da._launch(gpu, 512, True, 128, f16)["lazy"]
    monkeypatch.setattr(da, "TUNING", {"block_n": 32, "num_warps": 1, "split_d": False,
                                       "i8_qk": True, "lazy": True})
    cfg = da._launch(gpu, 512, True, 128, bf16)
    assert not cfg["i8_qk"] and not cfg["lazy"]  # whole tiles have neither


def test_decode_fast_int8_needs_word_aligned_rows():
    """FAST_I8 reads V rows as int32 words: a layer whose rows may start off a 4-byte
    boundary (a caller's view) takes the byte loads instead."""
    flat = torch.zeros(2 * 4 * 16 * 2 * 16 + 4, dtype=torch.int8)
    shape = (2, 4, 16, 2, 16)
    assert da.words_aligned(flat[: flat.numel() - 4].view(shape))
    assert not da.words_aligned(flat[1: flat.numel() - 3].view(shape))  # storage offset 1
    odd = flat.as_strided((2, 4, 16, 2, 16), (1030, 257, 16, 8, 1))  # row strides not 4k
    assert not da.words_aligned(odd)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "b,h,hkv,d,ctx_lens",
    [
        (1, 32, 8, 128, [4099]),
        (16, 32, 8, 128, [1, 15, 16, 17, 100, 511, 512, 513, 1000, 2047, 3000, 4096, 7, 8, 9, 333]),
        (8, 24, 8, 64, [777] * 8),
        (4, 64, 8, 128, [2500, 1, 64, 1800]),
        (3, 16, 16, 80, [300, 600, 900]),
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
@pytest.mark.parametrize("partition_size", [512, 128])
def test_decode_gpu(
    b, h, hkv, d, ctx_lens, kv_dtype, q_dtype, partition_size, make_layer, make_block_tables
):
    _check(
        b, h, hkv, d, ctx_lens, kv_dtype, q_dtype, "cuda", make_layer, make_block_tables,
        num_pages=1024, partition_size=partition_size,
    )  # fmt: skip


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("split_d", [False, True])
@pytest.mark.parametrize("partition_size", [512, 128, 64])
def test_decode_gpu_halves_and_whole_tiles(
    kv_dtype, split_d, partition_size, make_layer, make_block_tables, monkeypatch
):
    """Both tile paths under each GPU launch rule (whichever one the rule picks)."""
    cfg = da._launch(torch.device("cuda"), partition_size, kv_dtype == torch.int8, 128)
    monkeypatch.setattr(da, "TUNING", {**cfg, "split_d": split_d})
    _check(
        4, 32, 8, 128, [1, 300, 2047, 4096], kv_dtype, torch.bfloat16, "cuda", make_layer,
        make_block_tables, num_pages=1024, partition_size=partition_size,
    )  # fmt: skip


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("partition_size", [512, 128])
def test_decode_gpu_int8_value_scales_of_any_magnitude(partition_size, make_layer, make_block_tables):
    """Value scales from 1e-6 to 1e2 within one tile: folded into the 16-bit probabilities
    before P @ V, none may underflow or overflow (a half-precision P would, unless the
    running max is weighted by the scales as FAST_I8's is; at 512-token partitions this
    runs FAST_I8, at 128 the bf16 path)."""
    ctx_lens = [1000, 37, 4096]
    data, scales = make_layer(512, 8, 128, torch.int8, "cuda")
    spread = torch.empty(scales.shape[1:], device="cuda").uniform_(-6.0, 2.0)
    scales[1] *= torch.pow(10.0, spread)
    tables = make_block_tables(ctx_lens, 512, 256, "cuda")
    ctx = torch.tensor(ctx_lens, device="cuda")
    q = torch.randn(3, 32, 128, device="cuda").to(torch.bfloat16)
    out = decode_attention(q, data, scales, tables, ctx, partition_size=partition_size).float()
    ref = decode_attention_reference(q.float(), data, scales, tables, ctx)
    err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert err < 2e-2, err


def _rel_err(out, ref):
    return ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


# GQA 4, 3, 1 and 8; head dims 128 and 64; contexts on and off the tile and page grids
INT8_GPU_CASES = pytest.mark.parametrize(
    "h,hkv,d,ctx_lens",
    [(32, 8, 128, [1, 31, 32, 33, 700, 4096]), (9, 3, 64, [5, 1000, 129]),
     (16, 16, 128, [2047, 64]), (32, 4, 64, [300, 17])],
)


def _int8_gpu_case(h, hkv, d, ctx_lens, q_dtype, make_layer, make_block_tables):
    """-> (q, data, scales, tables, ctx, the fp32 reference with the pages dequantized exactly)."""
    data, scales = make_layer(1024, hkv, d, torch.int8, "cuda")
    tables = make_block_tables(ctx_lens, 1024, 300, "cuda")
    ctx = torch.tensor(ctx_lens, device="cuda")
    q = torch.randn(len(ctx_lens), h, d, device="cuda").to(q_dtype)
    return q, data, scales, tables, ctx, decode_attention_reference(q.float(), data, scales, tables, ctx)


@pytest.mark.gpu
@CUDA
@INT8_GPU_CASES
@pytest.mark.parametrize("partition_size", [512, 128, 64])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_decode_gpu_fast_int8_against_the_conversion_path(
    h, hkv, d, ctx_lens, partition_size, q_dtype, make_layer, make_block_tables, monkeypatch
):
    """FAST_I8 (fp16 dots, the ALU conversions, V read in words, the weighted running max)
    and the plain conversion path, both against the fp32 reference (pages dequantized
    exactly): GQA 1, 3, 4 and 8, head dims 64 and 128, every tile shape the rules pick.
    fp16 keeps more bits than bf16, so the fast path must be at least as close."""
    q, data, scales, tables, ctx, ref = _int8_gpu_case(h, hkv, d, ctx_lens, q_dtype, make_layer,
                                                       make_block_tables)
    errs = {}
    rule = da._launch(torch.device("cuda"), partition_size, True, d, q_dtype)
    for fast in (True, False):
        monkeypatch.setattr(da, "TUNING", {**rule, "fast_i8": fast})
        assert da.launch_config(q, data, partition_size, True)["fast_i8"] is fast
        out = decode_attention(q, data, scales, tables, ctx, partition_size=partition_size)
        assert out.dtype == q_dtype
        errs[fast] = _rel_err(out, ref)
    assert errs[True] < 1e-2 and errs[True] <= 1.25 * errs[False] + 1e-3, errs


@pytest.mark.gpu
@CUDA
@INT8_GPU_CASES
@pytest.mark.parametrize("partition_size", [512, 128, 64])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast", [True, False])
def test_decode_gpu_int8_scores_from_int8_dots(
    h, hkv, d, ctx_lens, partition_size, q_dtype, fast, make_layer, make_block_tables, monkeypatch
):
    """I8_QK (scores from int8 dots, the query in two int8 parts) and LAZY (the running max
    moved only past a margin) on the GPU's tiles in halves, with V by FAST_I8's words or by
    the conversion path: against the fp32 reference, each at least as close as the same
    tile with the 16-bit query dot and eager rescaling."""
    q, data, scales, tables, ctx, ref = _int8_gpu_case(h, hkv, d, ctx_lens, q_dtype, make_layer,
                                                       make_block_tables)
    errs = {}
    rule = da._launch(torch.device("cuda"), partition_size, True, d, q_dtype)
    for i8, lazy in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(da, "TUNING", {**rule, "split_d": True, "fast_i8": fast, "i8_qk": i8,
                                           "lazy": lazy})
        cfg = da.launch_config(q, data, partition_size, True)
        # LAZY stays off for fp16 queries without FAST_I8 (_drop_unsafe_lazy)
        want_lazy = lazy and (fast or q_dtype != torch.float16)
        assert (cfg["i8_qk"], cfg["lazy"], cfg["fast_i8"]) == (i8, want_lazy, fast)
        out = decode_attention(q, data, scales, tables, ctx, partition_size=partition_size)
        assert out.dtype == q_dtype
        errs[i8, lazy] = _rel_err(out, ref)
    base = errs.pop((False, False))
    assert all(e < 1e-2 and e <= 1.25 * base + 1e-3 for e in errs.values()), (base, errs)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "q_mag,v_mag", [(1e-6, 1.0), (1e6, 1.0), (1.0, 1e-12), (1.0, 1e7), (1e3, 1e-9), (1e6, 1e7)]
)
@pytest.mark.parametrize("partition_size", [512, 64])
@pytest.mark.parametrize("i8_qk,lazy", [(False, False), (True, False), (True, True)])
def test_decode_gpu_fast_int8_at_any_magnitude(q_mag, v_mag, partition_size, i8_qk, lazy,
                                               make_layer, make_block_tables, monkeypatch):
    """fp16 has a narrow range: FAST_I8 scales the queries and the weighted probabilities
    into it, so queries and value scales far from 1 (every value scale of a head tiny, or
    huge) keep their relative accuracy, with no inf or NaN. Unscaled, queries of 1e6 and
    value scales of 1e7 / 127 would overflow fp16 (65504), and scales of 1e-12 / 127
    would fall into its subnormals."""
    ctx_lens = [1, 900, 4096]
    data, scales = make_layer(600, 8, 128, torch.int8, "cuda")
    scales[1] *= v_mag
    tables = make_block_tables(ctx_lens, 600, 256, "cuda")
    ctx = torch.tensor(ctx_lens, device="cuda")
    q = (torch.randn(3, 32, 128, device="cuda") * q_mag).to(torch.bfloat16)
    cfg = da._launch(torch.device("cuda"), partition_size, True, 128)
    monkeypatch.setattr(da, "TUNING", {**cfg, "fast_i8": True, "split_d": i8_qk or cfg["split_d"],
                                       "i8_qk": i8_qk, "lazy": lazy})
    ran = da._launch(torch.device("cuda"), partition_size, True, 128)
    assert (ran["fast_i8"], ran["i8_qk"], ran["lazy"]) == (True, i8_qk, lazy)
    assert da.words_aligned(data)
    out = decode_attention(q, data, scales, tables, ctx, partition_size=partition_size)
    assert torch.isfinite(out).all()
    assert _rel_err(out, decode_attention_reference(q.float(), data, scales, tables, ctx)) < 2e-2


@pytest.mark.gpu
@CUDA
def test_decode_gpu_int8_misaligned_view_takes_the_byte_loads(make_layer, make_block_tables):
    """A layer viewed one byte into its storage, under the rule that takes FAST_I8 (512-token
    partitions, D128): decode falls back to the byte loads and still matches the
    reference, instead of a misaligned int32 load."""
    data, scales = make_layer(64, 8, 128, torch.int8, "cuda")
    buf = torch.empty(data.numel() + 1, dtype=torch.int8, device="cuda")
    shifted = buf[1:].view(data.shape)
    shifted.copy_(data)
    assert not da.words_aligned(shifted)
    assert da._launch(torch.device("cuda"), 512, True, 128)["fast_i8"]
    ctx_lens = [700, 33]
    tables = make_block_tables(ctx_lens, 64, 48, "cuda")
    ctx = torch.tensor(ctx_lens, device="cuda")
    q = torch.randn(2, 32, 128, device="cuda").to(torch.bfloat16)
    assert not da.launch_config(q, shifted, 512, True)["fast_i8"]
    assert da.launch_config(q, data, 512, True)["fast_i8"]
    out = decode_attention(q, shifted, scales, tables, ctx, partition_size=512)
    assert _rel_err(out, decode_attention_reference(q.float(), data, scales, tables, ctx)) < 1e-2
