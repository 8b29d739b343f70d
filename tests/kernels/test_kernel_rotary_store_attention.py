"""kernels.decode_attention.rotary_store_decode_attention: a decode step's rotary + K/V store
folded into the partition kernel, against the two launches it replaces and the references."""

import pytest
import torch

pytest.importorskip("triton")

import kernels.decode_attention as da  # noqa: E402
from kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    rotary_store_decode_attention,
)
from kernels.kv_store import rotary_store_kv, rotary_store_kv_reference  # noqa: E402

# (H, Hkv, D, ctx_lens): GQA 1 / 3 / 4 / 8; the new token first, middle and last in its
# 32-token partition, and alone in a one-token context
CASES = [
    (4, 4, 32, [1, 33, 64]),
    (12, 4, 64, [17, 100]),
    (8, 2, 32, [32, 65, 96]),
    (8, 1, 64, [2, 47]),
]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3)}
# the interpreter's own launch (16-token tiles in halves, one warp), made explicit so that
# these tests take the fused path on a GPU too (whose rules give int8 whole tiles at small
# partitions); the GPU test at the end runs the engine's rules
HALVES = {"block_n": 16, "num_warps": 1, "split_d": True}


def _rope(max_pos, d, device, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _step(h, hkv, d, ctx_lens, kv_dtype, q_dtype, device, make_layer, pad=0, num_pages=24):
    """A decode step's inputs: each sequence's new token at position ctx - 1, its slot the
    one its block table gives that position; `pad` extra rows of CUDA-graph padding
    (ctx 0, slot -1)."""
    data, scales = make_layer(num_pages, hkv, d, kv_dtype, device)
    # no page in two sequences (the pool never shares one that is written): the fused launch
    # stores each token while other sequences attend, the two launches store them all first
    width = max(-(-n // 16) for n in ctx_lens) + 1
    tables = torch.zeros(len(ctx_lens) + pad, width, dtype=torch.int32)
    pages = torch.randperm(num_pages).tolist()
    for i, n in enumerate(ctx_lens):
        for j in range(-(-n // 16)):
            tables[i, j] = pages.pop()
    tables = tables.to(device)
    pos = torch.tensor([n - 1 for n in ctx_lens] + [0] * pad, device=device)
    slots = torch.tensor(
        [int(tables[i, (n - 1) // 16]) * 16 + (n - 1) % 16 for i, n in enumerate(ctx_lens)]
        + [-1] * pad, device=device)
    b = len(ctx_lens) + pad
    q = torch.randn(b, h, d, device=device).to(q_dtype)
    k = torch.randn(b, hkv, d, device=device).to(q_dtype)
    v = torch.randn(b, hkv, d, device=device).to(q_dtype)
    cos, sin = _rope(max(ctx_lens) + 1, d, device, q_dtype)
    ctx = torch.tensor(ctx_lens + [0] * pad, device=device)
    return dict(pos=pos, q=q, k=k, v=v, cos=cos, sin=sin, data=data, scales=scales, slots=slots,
                tables=tables, ctx=ctx)


def _clone(x):
    return None if x is None else x.clone()


def _fused(s, psize):
    data, scales, q = s["data"].clone(), _clone(s["scales"]), s["q"].clone()
    out = rotary_store_decode_attention(s["pos"], q, s["k"], s["v"], s["cos"], s["sin"], data,
                                        scales, s["slots"], s["tables"], s["ctx"],
                                        partition_size=psize)
    return out, data, scales, q


def _two_launches(s, psize):
    data, scales, q = s["data"].clone(), _clone(s["scales"]), s["q"].clone()
    rotary_store_kv(s["pos"], q, s["k"], s["v"], s["cos"], s["sin"], data, scales, s["slots"])
    out = decode_attention(q, data, scales, s["tables"], s["ctx"], partition_size=psize)
    return out, data, scales


@pytest.mark.parametrize("h,hkv,d,ctx_lens", CASES)
@pytest.mark.parametrize(
    "kv_dtype,q_dtype",
    [(torch.float32, torch.float32), (torch.int8, torch.float32), (torch.float16, torch.float16)],
)
def test_fused_store_equals_the_two_launches_and_the_reference(
    h, hkv, d, ctx_lens, kv_dtype, q_dtype, device, make_layer, monkeypatch
):
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    monkeypatch.setattr(da, "TUNING", HALVES)
    s = _step(h, hkv, d, ctx_lens, kv_dtype, q_dtype, device, make_layer)
    assert da.fuses_rotary_store(s["q"], s["data"], 32)
    out, data, scales, q_after = _fused(s, 32)
    out2, data2, scales2 = _two_launches(s, 32)
    # the cache holds exactly what rotary_store_kv writes, and nothing else moved
    torch.testing.assert_close(data, data2, rtol=0, atol=0)
    if scales is not None:
        torch.testing.assert_close(scales, scales2, rtol=0, atol=0)
    rtol, atol = TOL[q_dtype]
    torch.testing.assert_close(out, out2, rtol=rtol, atol=atol)
    # one launch: q is read, never rotated in place
    torch.testing.assert_close(q_after, s["q"], rtol=0, atol=0)
    # and the references, step by step
    data3, scales3, q3 = s["data"].clone(), _clone(s["scales"]), s["q"].clone()
    rotary_store_kv_reference(s["pos"], q3, s["k"], s["v"], s["cos"], s["sin"], data3, scales3,
                              s["slots"])
    if kv_dtype == torch.int8:  # int8 values may differ by one step where x / scale ties
        assert (data.int() - data3.int()).abs().max() <= 1
        torch.testing.assert_close(scales, scales3, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(data, data3, rtol=0, atol=0)
    ref = decode_attention_reference(q3, data3, scales3, s["tables"], s["ctx"])
    torch.testing.assert_close(out, ref, rtol=max(rtol, 3e-3), atol=max(atol, 3e-3))


def test_fused_store_skips_padding_rows(device, make_layer, monkeypatch):
    """Graph padding (ctx 0, slot -1) gets a zero output and writes no page."""
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    monkeypatch.setattr(da, "TUNING", HALVES)
    s = _step(8, 2, 32, [40], torch.int8, torch.float32, device, make_layer, pad=2)
    assert da.fuses_rotary_store(s["q"], s["data"], 32)
    out, data, scales, _ = _fused(s, 32)
    out2, data2, scales2 = _two_launches(s, 32)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    assert torch.equal(data, data2) and torch.equal(scales, scales2)
    changed = (data != s["data"]).flatten(3).any(-1).nonzero().tolist()  # [kv, page, slot]
    slot = int(s["slots"][0])
    assert {(p, o) for _, p, o in changed} <= {(slot // 16, slot % 16)} and changed


def test_fused_store_only_on_tiles_in_halves(device, make_layer, monkeypatch):
    """Whole tiles (or the switch off) take the two launches, which rotate q in place."""
    s = _step(8, 2, 24, [30], torch.float32, torch.float32, device, make_layer)
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    monkeypatch.setattr(da, "TUNING", HALVES)
    assert not da.fuses_rotary_store(s["q"], s["data"], 32)  # D24: no halves
    out, data, _, q_after = _fused(s, 32)
    out2, data2, _ = _two_launches(s, 32)
    assert torch.equal(data, data2)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    assert not torch.equal(q_after, s["q"])  # rotated in place by rotary_store_kv
    s = _step(8, 2, 32, [30], torch.float32, torch.float32, device, make_layer)
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", False)
    assert not da.fuses_rotary_store(s["q"], s["data"], 32)
    _, _, _, q_after = _fused(s, 32)
    assert not torch.equal(q_after, s["q"])
    monkeypatch.setattr(da, "TUNING", {"block_n": 16, "num_warps": 1, "split_d": False})
    with pytest.raises(ValueError, match="halves"):
        da._run(s["q"], s["data"], None, s["tables"], s["ctx"], 0.1, 32,
                new_kv=(s["pos"], s["k"], s["v"], s["cos"], s["sin"], s["slots"]))


def test_fused_store_checks_its_arguments(device, make_layer, monkeypatch):
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    s = _step(8, 2, 32, [30], torch.float32, torch.float32, device, make_layer)
    with pytest.raises(ValueError, match="slots"):
        rotary_store_decode_attention(s["pos"], s["q"], s["k"], s["v"], s["cos"], s["sin"],
                                      s["data"], None, s["slots"][:0], s["tables"], s["ctx"],
                                      partition_size=32)
    with pytest.raises(ValueError, match="partition_size"):
        rotary_store_decode_attention(s["pos"], s["q"], s["k"], s["v"], s["cos"], s["sin"],
                                      s["data"], None, s["slots"], s["tables"], s["ctx"],
                                      partition_size=24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize(
    "h,hkv,d,ctx_lens,psize",
    [
        (32, 8, 128, [512], 64),  # 8B, batch 1
        (9, 3, 64, [300, 1, 64, 65], 64),  # SmolLM2
        (32, 8, 128, [1000, 4097, 8192, 1, 513] + [700] * 3, 512),  # the int8 tiles' rule
    ],
)
def test_fused_store_on_gpu_in_a_cuda_graph(h, hkv, d, ctx_lens, psize, kv_dtype, make_layer,
                                            monkeypatch):
    """GPU programs run concurrently: the token's own program must store it before any of
    its tiles read it. Eager and graph-replayed (new inputs copied in) against the two
    launches, on the engine's launch rules for these shapes."""
    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    num_pages = sum(-(-n // 16) for n in ctx_lens) + 8

    def step(seed):
        """Each new key is its group's mean query (rotated alike, so their dot stays): a
        score ~sqrt(D) above the random keys', so the new token carries most of the
        softmax and a tile that read the row before it was stored would be far off."""
        torch.manual_seed(seed)
        s = _step(h, hkv, d, ctx_lens, kv_dtype, torch.bfloat16, "cuda", make_layer,
                  num_pages=num_pages)
        s["k"] = s["q"].view(len(ctx_lens), hkv, h // hkv, d).float().mean(2).to(s["k"].dtype)
        return s

    s = step(0)
    # int8 pages take tiles in halves only at D128 on 128+ token partitions (_launch)
    fused = kv_dtype != torch.int8 or (d == 128 and psize >= 128)
    assert da.fuses_rotary_store(s["q"], s["data"], psize) == fused
    out, data, scales, q_after = _fused(s, psize)
    out2, data2, scales2 = _two_launches(s, psize)
    assert torch.equal(data, data2) and (scales is None or torch.equal(scales, scales2))
    torch.testing.assert_close(out, out2, rtol=2e-2, atol=2e-2)
    assert torch.equal(q_after, s["q"]) == fused  # the two launches rotate q in place

    # one capture, then replays over other inputs copied into the same buffers
    live = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rotary_store_decode_attention(live["pos"], live["q"], live["k"], live["v"], live["cos"],
                                      live["sin"], live["data"], live["scales"], live["slots"],
                                      live["tables"], live["ctx"], partition_size=psize)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = rotary_store_decode_attention(
            live["pos"], live["q"], live["k"], live["v"], live["cos"], live["sin"], live["data"],
            live["scales"], live["slots"], live["tables"], live["ctx"], partition_size=psize)
    for seed in (1, 2):
        t = step(seed)
        for key in ("pos", "q", "k", "v", "data", "slots", "tables", "ctx"):
            live[key].copy_(t[key])
        if t["scales"] is not None:
            live["scales"].copy_(t["scales"])
        graph.replay()
        want, want_data, want_scales = _two_launches(t, psize)
        assert torch.equal(live["data"], want_data)
        assert t["scales"] is None or torch.equal(live["scales"], want_scales)
        torch.testing.assert_close(graph_out, want, rtol=2e-2, atol=2e-2)
