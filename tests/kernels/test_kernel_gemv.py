"""kernels.gemv (few-row linear layers, plain and with the gated MLP's SiLU) against torch."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels.gemv  # noqa: E402
from kernels.gemv import (  # noqa: E402
    MAX_ROWS,
    NORM_MAX_K,
    fuses_norm,
    gemv,
    gemv_add,
    gemv_add_reference,
    gemv_add_rmsnorm,
    gemv_add_rmsnorm_reference,
    gemv_reference,
    gemv_rmsnorm_sums,
    gemv_rmsnorm_sums_reference,
    gemv_with_config,
    splits_norm,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# fp32 sums in another order than the reference's, rounded once to the output dtype
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}


def _inputs(m, n, k, dtype, device, bias=False):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _check(m, n, k, dtype, device, bias=False, gated=False, config=None):
    x, w, b = _inputs(m, n, k, dtype, device, bias)
    out = gemv_with_config(x, w, b, gated, config) if config else gemv(x, w, b, gated)
    ref = gemv_reference(x, w, b, gated)
    assert out.shape == ref.shape == (m, n // 2 if gated else n) and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return out


# k not a multiple of any BLOCK_K, n not a multiple of BLOCK_N, rows 1..MAX_ROWS (padded rows)
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (1, 130, 200), (3, 64, 96), (5, 33, 48), (16, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_reference(m, n, k, dtype, device):
    _check(m, n, k, dtype, device)


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (2, 50, 40)])
def test_gemv_bias_and_gated(m, n, k, device):
    _check(m, n, k, torch.float32, device, bias=True)
    out = _check(m, n, k, torch.float32, device, gated=True)
    _check(m, n, k, torch.float32, device, bias=True, gated=True)
    # gated = the two-step silu(gate) * up of the plain product, not the product's first half
    x, w, _ = _inputs(m, n, k, torch.float32, device)
    plain = gemv(x, w)
    assert not torch.allclose(out, plain[:, : n // 2], atol=1e-3)


@pytest.mark.parametrize("config", [(1, 16, 1, False), (2, 32, 2, True), (8, 64, 4, False), (16, 16, 1, True)])
def test_gemv_configs(config, device):
    """Every (BLOCK_N, BLOCK_K, warps, REDUCE_EACH) a sweep may try gives the same product."""
    _check(2, 72, 80, torch.float32, device, config=config)
    _check(1, 72, 80, torch.float32, device, gated=True, config=config)


def test_gemv_tuned_configs_take_over_the_defaults(device, monkeypatch):
    """A TUNED entry (what bench/gemv.py's sweep fills before capturing decode graphs) is the
    launch config for its (rows, N, K, gated) only; the product stays the reference's."""
    import kernels.gemv as g

    launches = []
    real = g._gemv_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["REDUCE_EACH"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(g, "_gemv_kernel", Recorder())
    monkeypatch.setattr(g, "TUNED", {(4, 36, 80, True): (2, 32, 1, False)})
    _check(3, 72, 80, torch.float32, device, gated=True)  # 3 rows pad to 4: tuned
    _check(3, 72, 80, torch.float32, device)  # not gated: the defaults
    _check(1, 72, 80, torch.float32, device, gated=True)  # 1 row: the defaults
    assert launches[0] == ((18,), 2, 32, False)
    defaults = [g.default_config(3, 72, 80, False), g.default_config(1, 36, 80, True)]
    assert [(bn, bk, red) for _, bn, bk, red in launches[1:]] == [(c[0], c[1], c[3]) for c in defaults]
    assert all(c != (2, 32, 1, False) for c in defaults)


def test_gemv_strided_rows(device):
    x = torch.randn(3, 100, device=device)[:, :64]  # row stride 100
    w = torch.randn(48, 80, device=device)[:, :64]  # row stride 80
    torch.testing.assert_close(gemv(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_gemv_gated_bias_strided_weight(device):
    """The up rows sit n_out row strides past the gate rows, and their bias past the gate's."""
    w = torch.randn(40, 96, device=device)[:, :64]  # [2I = 40, K = 64], row stride 96
    x, b = torch.randn(3, 64, device=device), torch.randn(40, device=device)
    torch.testing.assert_close(gemv(x, w, b, gated=True), gemv_reference(x, w, b, gated=True),
                               rtol=1e-4, atol=1e-4)


def test_engine_row_limit_is_the_kernels():
    from engine.llm import GEMV_MAX_ROWS

    assert GEMV_MAX_ROWS == MAX_ROWS


def test_gemv_empty(device):
    w = torch.randn(8, 16, device=device)
    assert gemv(torch.randn(0, 16, device=device), w).shape == (0, 8)


@pytest.mark.parametrize("bad,match", [
    (lambda d: (torch.randn(2, 8, device=d), torch.randn(4, 9, device=d), None, False), "features"),
    (lambda d: (torch.randn(MAX_ROWS + 1, 8, device=d), torch.randn(4, 8, device=d), None, False), "at most"),
    (lambda d: (torch.randn(2, 8, device=d), torch.randn(4, 8, device=d).half(), None, False), "share a dtype"),
    (lambda d: (torch.randn(2, 8, device=d), torch.randn(5, 8, device=d), None, True), "even number"),
    (lambda d: (torch.randn(2, 8, device=d), torch.randn(4, 8, device=d), torch.randn(3, device=d), False),
     "bias"),
    (lambda d: (torch.randn(8, device=d), torch.randn(4, 8, device=d), None, False), r"\[M, K\]"),
    (lambda d: (torch.randn(2, 8, device=d), torch.randn(8, 4, device=d).t(), None, False), "contiguous"),
    (lambda d: (torch.randint(0, 3, (2, 8), device=d), torch.randn(4, 8, device=d), None, False), "float"),
])
def test_gemv_rejects_bad_input(bad, match, device):
    with pytest.raises(ValueError, match=match):
        gemv(*bad(device))


def _norm_inputs(m, n, k, dtype, device, bias=False):
    x, w, b = _inputs(m, n, k, dtype, device, bias)
    residual = torch.randn(m, k, device=device).to(dtype)
    weight = (torch.rand(k, device=device) + 0.5).to(dtype)
    return x, residual, weight, w, b


# rows 1..MAX_ROWS, K below / at / off a power of two (SmolLM2's 576), N off the blocks
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (3, 130, 200), (2, 64, 576), (16, 40, 48)])
@pytest.mark.parametrize("gated,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_add_rmsnorm_is_the_two_kernels(m, n, k, gated, bias, dtype, device):
    """gemv_add_rmsnorm gives what fused_add_rmsnorm then gemv give (bit for bit: the same
    roundings, the row's sum of squares in one block), and the reference within the
    GEMV's tolerance; the residual it returns is x + residual, written in shares by
    every program."""
    from kernels.rmsnorm import fused_add_rmsnorm

    x, residual, weight, w, b = _norm_inputs(m, n, k, dtype, device, bias)
    out, summed = gemv_add_rmsnorm(x, residual, weight, 1e-6, w, b, gated)
    h, summed_ref = fused_add_rmsnorm(x, residual, weight, 1e-6)
    torch.testing.assert_close(out, gemv(h, w, b, gated), rtol=0, atol=0)
    assert torch.equal(summed, summed_ref)
    ref, ref_summed = gemv_add_rmsnorm_reference(x, residual, weight, 1e-6, w, b, gated)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    assert torch.equal(summed, ref_summed) and out.shape == (m, n // 2 if gated else n)


def test_gemv_add_rmsnorm_writes_the_whole_residual(device):
    """Every column of x + residual is written, whichever program's share it is in: with
    more programs than columns, and with fewer."""
    for n in (4, 512):  # 1-4 programs, then more programs than the 48 columns
        x, residual, weight, w, _ = _norm_inputs(3, n, 48, torch.float32, device)
        _, summed = gemv_add_rmsnorm(x, residual, weight, 1e-6, w)
        torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "residual": torch.randn(3, 64)}, "residual must be"),
    (lambda a: {**a, "residual": torch.randn(2, 64).half()}, "residual must be"),
    (lambda a: {**a, "norm_weight": torch.randn(32)}, "norm_weight"),
    (lambda a: {**a, "norm_weight": torch.randn(64).half()}, "norm_weight"),
])
def test_gemv_add_rmsnorm_rejects_bad_input(change, match, device):
    args = dict(x=torch.randn(2, 64), residual=torch.randn(2, 64), norm_weight=torch.randn(64),
                eps=1e-6, w=torch.randn(8, 64))
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change(args).items()}
    with pytest.raises(ValueError, match=match):
        gemv_add_rmsnorm(**args)


def test_gemv_add_rmsnorm_only_for_rows_it_can_hold(device):
    k = NORM_MAX_K + 64
    assert fuses_norm(NORM_MAX_K) and not fuses_norm(k)
    x, residual, weight, w, _ = _norm_inputs(1, 8, k, torch.float32, device)
    with pytest.raises(ValueError, match=f"at most {NORM_MAX_K} features"):
        gemv_add_rmsnorm(x, residual, weight, 1e-6, w)


def _split_inputs(m, n, k, dtype, device, bias=False):
    """x [m, k] and w [n, k] for gemv_add, its residual [m, n], and a norm weight [n] and
    next layer's w2 [40, n] for gemv_rmsnorm_sums."""
    x, w, b = _inputs(m, n, k, dtype, device, bias)
    residual = torch.randn(m, n, device=device).to(dtype)
    weight = (torch.rand(n, device=device) + 0.5).to(dtype)
    w2 = (torch.randn(40, n, device=device) / n ** 0.5).to(dtype)
    return x, w, b, residual, weight, w2


# rows 1..MAX_ROWS, K and N off the blocks
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (3, 130, 200), (16, 40, 48)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_add_is_the_two_steps(m, n, k, bias, dtype, device):
    """gemv_add = gemv then the residual add, bit for bit (each rounded once); its sums
    are, per program, the sums of squares of that program's columns of the result."""
    x, w, b, residual, _, _ = _split_inputs(m, n, k, dtype, device, bias)
    h, sums = gemv_add(x, w, residual, b)
    assert torch.equal(h, (gemv(x, w, b).float() + residual.float()).to(dtype))
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(h, gemv_add_reference(x, w, residual, b), rtol=rtol, atol=atol)
    block_n = kernels.gemv._config(m, n, k, False)[0]
    assert sums.dtype == torch.float32 and sums.shape == (m, -(-n // block_n))
    squares = torch.nn.functional.pad(h.float() ** 2, (0, sums.shape[1] * block_n - n))
    torch.testing.assert_close(sums, squares.view(m, -1, block_n).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (3, 130, 200), (16, 40, 48)])
@pytest.mark.parametrize("gated,bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype,scale_after", [(torch.float32, False), (torch.float16, False),
                                               (torch.float16, True)])  # fp32 takes the same path
def test_gemv_rmsnorm_sums_is_the_two_kernels(m, n, k, gated, bias, dtype, scale_after, device,
                                              monkeypatch):
    """gemv_rmsnorm_sums on gemv_add's output and sums gives rmsnorm then gemv: its
    roundings, its sum of squares in another order (so within an ulp of the norm's
    output, not bit for bit); the reference within the GEMV's tolerance; with the scale
    after the loop (SPLIT_SCALE_AFTER, no rounding of the norm's output) the same within
    that tolerance. It uses only the sums' row totals: the same squares summed into 3
    other parts give the same."""
    from kernels.rmsnorm import rmsnorm

    monkeypatch.setattr(kernels.gemv, "SPLIT_SCALE_AFTER", scale_after)
    x, w, _, residual, weight, w2 = _split_inputs(m, n, k, dtype, device)
    b2 = torch.randn(w2.shape[0], device=device).to(dtype) if bias else None
    h, sums = gemv_add(x, w, residual)
    out = gemv_rmsnorm_sums(h, sums, weight, 1e-6, w2, b2, gated)
    assert out.shape == (m, 20 if gated else 40) and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, gemv(rmsnorm(h, weight, 1e-6), w2, b2, gated), rtol=rtol, atol=atol)
    torch.testing.assert_close(out, gemv_rmsnorm_sums_reference(h, weight, 1e-6, w2, b2, gated),
                               rtol=rtol, atol=atol)
    thirds = torch.stack([part.float().pow(2).sum(-1) for part in h.tensor_split(3, dim=1)], dim=1)
    again = gemv_rmsnorm_sums(h, thirds.contiguous(), weight, 1e-6, w2, b2, gated)
    torch.testing.assert_close(again, out, rtol=rtol, atol=atol)
    wrong = gemv_rmsnorm_sums(h, thirds * 4, weight, 1e-6, w2, b2, gated)  # a scale off by 2
    assert not torch.allclose(wrong.float(), out.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("m,reduce_each", [(1, False), (3, True)])
@pytest.mark.parametrize("scale_after", [False, True])
def test_gemv_rmsnorm_sums_over_several_k_steps(m, reduce_each, scale_after, device, monkeypatch):
    """The row's scale is summed once, in the first K step, and used in every later one
    (or, SPLIT_SCALE_AFTER, once after the last): here K = 200 in 32-wide steps (a TUNED
    config), against rmsnorm then gemv."""
    from kernels.rmsnorm import rmsnorm

    monkeypatch.setattr(kernels.gemv, "SPLIT_SCALE_AFTER", scale_after)
    n, k = 40, 200
    x, w, _, residual, weight, _ = _split_inputs(m, k, 64, torch.float32, device)
    h, sums = gemv_add(x, w, residual)
    w2 = (torch.randn(2 * n, k, device=device) / k ** 0.5)
    for gated in (False, True):
        rows = 1 if m == 1 else 4
        monkeypatch.setitem(kernels.gemv.TUNED, (rows, n if gated else 2 * n, k, gated), (4, 32, 4, reduce_each))
        out = gemv_rmsnorm_sums(h, sums, weight, 1e-6, w2, None, gated)
        rtol, atol = TOL[torch.float32]
        torch.testing.assert_close(out, gemv(rmsnorm(h, weight, 1e-6), w2, None, gated), rtol=rtol, atol=atol)


def test_splits_norm_takes_the_rows_gemv_add_rmsnorm_cannot(monkeypatch):
    monkeypatch.setattr(kernels.gemv, "SPLIT_NORM", True)
    assert splits_norm(NORM_MAX_K + 1) and splits_norm(4096) and splits_norm(4096, 8)
    assert not splits_norm(NORM_MAX_K) and not splits_norm(576)
    assert not splits_norm(4096, kernels.gemv.SPLIT_MAX_ROWS + 1)  # the sums would not fit
    monkeypatch.setattr(kernels.gemv, "SPLIT_NORM", False)
    assert not splits_norm(4096)


@pytest.mark.parametrize("call,match", [
    (lambda d: gemv_add(torch.randn(2, 64, device=d), torch.randn(8, 64, device=d), torch.randn(2, 64, device=d)),
     "residual must be"),
    (lambda d: gemv_add(torch.randn(2, 64, device=d), torch.randn(8, 64, device=d),
                        torch.randn(2, 8, device=d).half()), "residual must be"),
    (lambda d: gemv_rmsnorm_sums(torch.randn(2, 64, device=d), torch.randn(2, 4, device=d).double(),
                                 torch.randn(64, device=d), 1e-6, torch.randn(8, 64, device=d)), "sums must be"),
    (lambda d: gemv_rmsnorm_sums(torch.randn(2, 64, device=d), torch.randn(3, 4, device=d),
                                 torch.randn(64, device=d), 1e-6, torch.randn(8, 64, device=d)), "sums must be"),
    (lambda d: gemv_rmsnorm_sums(torch.randn(2, 64, device=d), torch.randn(2, 0, device=d),
                                 torch.randn(64, device=d), 1e-6, torch.randn(8, 64, device=d)), "sums must be"),
    (lambda d: gemv_rmsnorm_sums(torch.randn(2, 64, device=d), torch.randn(2, 4, device=d),
                                 torch.randn(32, device=d), 1e-6, torch.randn(8, 64, device=d)), "norm_weight"),
])
def test_split_norm_rejects_bad_input(call, match, device):
    with pytest.raises(ValueError, match=match):
        call(device)


def _op_args(name, device):
    x, w, b, residual, weight, w2 = _split_inputs(3, 48, 32, torch.float32, device, bias=True)
    h = torch.randn(3, 48, device=device)
    sums = torch.stack([part.pow(2).sum(-1) for part in h.tensor_split(5, dim=1)], dim=1)
    return {
        "gemv": (x, w, b, False),
        "gemv_add_rmsnorm": (x, torch.randn_like(x), torch.rand(32, device=device) + 0.5, 1e-6, w, b, True),
        "gemv_add": (x, w, b, residual),
        "gemv_rmsnorm_sums": (h, sums.contiguous(), weight, 1e-6, w2, None, True),
    }[name]


@pytest.mark.parametrize("name", ["gemv", "gemv_add_rmsnorm", "gemv_add", "gemv_rmsnorm_sums"])
def test_gemv_opcheck(name, device):
    """Schema, fake implementation (also with dynamic shapes) and functionalization agree
    with the real op: gemv_add's sums have as many columns as its launch has programs,
    which the fake must give for any row count."""
    torch.library.opcheck(getattr(torch.ops.miniinfer, name).default, _op_args(name, device))


def test_early_prefetch_only_where_it_can_help(monkeypatch):
    """EARLY_PREFETCH = n asks for the first n K steps' tiles (at most the row) only on
    launches with PDL (only they start before the kernel ahead ends) over whole K steps (the
    steps inside the row) of 16-byte aligned rows, in chunks of whole 128-byte lines, about
    one a thread."""
    plan = kernels.gemv._prefetch_plan
    pdl, no_pdl = {"PDL": True, "launch_pdl": True}, {"PDL": False}
    w4096, w14336 = torch.empty(8, 4096, dtype=torch.bfloat16), torch.empty(8, 14336, dtype=torch.bfloat16)
    assert plan(pdl, w4096, 4096, 2048, 4, 4) == (0, 0)  # off by default
    monkeypatch.setattr(kernels.gemv, "EARLY_PREFETCH", 1)
    assert plan(pdl, w4096, 4096, 2048, 4, 4) == (32, 2048)  # 8B qkv / o at 1 row: 128 B a chunk, 1 a thread
    assert plan(pdl, w4096, 4096, 1024, 4, 2) == (16, 1024)  # gate_up: 16 lines a row
    assert plan(pdl, w14336, 14336, 2048, 4, 4) == (32, 2048)
    assert plan(no_pdl, w4096, 4096, 2048, 4, 4) == (0, 0)
    assert plan(pdl, torch.empty(8, 576, dtype=torch.bfloat16), 576, 1024, 4, 4) == (0, 0)  # K not whole steps
    assert plan(pdl, torch.empty(8, 32, dtype=torch.bfloat16), 32, 32, 4, 4) == (0, 0)  # a step under a line
    unaligned = torch.empty(8 * 4096 + 1, dtype=torch.bfloat16)[1:].view(8, 4096)
    assert plan(pdl, unaligned, 4096, 2048, 4, 4) == (0, 0)
    monkeypatch.setattr(kernels.gemv, "EARLY_PREFETCH", 2)
    assert plan(pdl, w4096, 4096, 1024, 4, 2) == (16, 2048)  # two steps: chunks of 256 B
    assert plan(pdl, w4096, 4096, 2048, 4, 4) == (32, 4096)  # the whole row
    monkeypatch.setattr(kernels.gemv, "EARLY_PREFETCH", 3)
    assert plan(pdl, w4096, 4096, 2048, 4, 4) == (32, 4096)  # never past it


def test_split_norm_under_torch_compile_as_rows_change(device):
    """One compiled function over gemv_add and gemv_rmsnorm_sums, called with 1, then 2,
    then 4 rows (dynamo then traces the rows as a symbol): the same as eager each time."""
    torch._dynamo.reset()
    x, w, _, residual, weight, w2 = _split_inputs(4, 96, 64, torch.float32, device)

    def both(a, r):
        h, sums = gemv_add(a, w, r)
        return gemv_rmsnorm_sums(h, sums, weight, 1e-5, w2, None, True)

    compiled = torch.compile(both, fullgraph=True)
    for m in (1, 2, 4):
        torch.testing.assert_close(compiled(x[:m], residual[:m]), both(x[:m], residual[:m]), rtol=0, atol=0)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, False), (4096, 14336, False), (28672, 4096, True),
                                        (960, 576, False), (3072, 576, True), (49152, 576, False)])
def test_gemv_gpu_shapes(m, n, k, gated):
    """The 8B and SmolLM2 decode shapes at every row count the engine sends here, bf16."""
    _check(m, n, k, torch.bfloat16, "cuda", gated=gated)


@pytest.mark.gpu
@CUDA
def test_gemv_gpu_in_graph_and_compile():
    x, w, b = _inputs(1, 4096, 4096, torch.bfloat16, "cuda", bias=True)
    out = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    gemv(x, w, b)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(gemv(x, w, b))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, gemv_reference(x, w, b), rtol=1.6e-2, atol=2e-2)
    compiled = torch.compile(lambda a: gemv(a, w, b, False), fullgraph=True)
    torch.testing.assert_close(compiled(x), gemv(x, w, b))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,gated", [(960, False), (3072, True), (49152, False)])
def test_gemv_add_rmsnorm_gpu(m, n, gated):
    """SmolLM2's decode shapes (K 576) in bf16: the two kernels' output (the norm's sum of
    squares may be added in another order on the GPU, so within bf16's tolerance; the
    residual bit for bit), in a CUDA graph and under torch.compile."""
    from kernels.rmsnorm import fused_add_rmsnorm

    rtol, atol = TOL[torch.bfloat16]
    x, residual, weight, w, _ = _norm_inputs(m, n, 576, torch.bfloat16, "cuda")
    out, summed = gemv_add_rmsnorm(x, residual, weight, 1e-5, w, None, gated)
    h, summed_ref = fused_add_rmsnorm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, gemv(h, w, None, gated), rtol=rtol, atol=atol)
    assert torch.equal(summed, summed_ref)
    graph, outs = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        outs.extend(gemv_add_rmsnorm(x, residual, weight, 1e-5, w, None, gated))
    x.copy_(torch.randn_like(x))
    graph.replay()
    h, summed_ref = fused_add_rmsnorm(x, residual, weight, 1e-5)
    torch.testing.assert_close(outs[0], gemv(h, w, None, gated), rtol=rtol, atol=atol)
    assert torch.equal(outs[1], summed_ref)
    compiled = torch.compile(lambda a: gemv_add_rmsnorm(a, residual, weight, 1e-5, w, None, gated),
                             fullgraph=True)
    for got, want in zip(compiled(x), gemv_add_rmsnorm(x, residual, weight, 1e-5, w, None, gated)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("scale_after", [False, True])
def test_split_norm_gpu_8b_shapes(m, scale_after, monkeypatch):
    """The 8B decode shapes in bf16: o and down as gemv_add (the result bit for bit as gemv
    + add), qkv and gate_up (gated) as gemv_rmsnorm_sums on them (the scale after the loop
    or not), against rmsnorm + gemv; in a CUDA graph and under torch.compile."""
    from kernels.rmsnorm import rmsnorm

    monkeypatch.setattr(kernels.gemv, "SPLIT_SCALE_AFTER", scale_after)
    rtol, atol = TOL[torch.bfloat16]
    for n_in, k_in in ((4096, 4096), (4096, 14336)):  # o, down
        x, w, _, residual, weight, _ = _split_inputs(m, n_in, k_in, torch.bfloat16, "cuda")
        h, sums = gemv_add(x, w, residual)
        assert torch.equal(h, (gemv(x, w).float() + residual.float()).to(torch.bfloat16))
        torch.testing.assert_close(sums.sum(-1), h.float().pow(2).sum(-1), rtol=1e-5, atol=1e-3)
        for n_out, gated in ((6144, False), (28672, True)):  # qkv, gate_up
            w2 = (torch.randn(n_out, 4096, device="cuda") / 64).to(torch.bfloat16)
            out = gemv_rmsnorm_sums(h, sums, weight, 1e-5, w2, None, gated)
            want = gemv(rmsnorm(h, weight, 1e-5), w2, None, gated)
            torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    graph, outs = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        h, sums = gemv_add(x, w, residual)
        outs.extend((h, gemv_rmsnorm_sums(h, sums, weight, 1e-5, w2, None, True)))
    x.copy_(torch.randn_like(x))
    graph.replay()
    h = (gemv(x, w).float() + residual.float()).to(torch.bfloat16)
    assert torch.equal(outs[0], h)
    torch.testing.assert_close(outs[1], gemv(rmsnorm(h, weight, 1e-5), w2, None, True), rtol=rtol, atol=atol)

    def both(a):
        hh, ss = gemv_add(a, w, residual)
        return gemv_rmsnorm_sums(hh, ss, weight, 1e-5, w2, None, True)

    torch.testing.assert_close(torch.compile(both, fullgraph=True)(x), both(x), rtol=0, atol=0)


@pytest.mark.gpu
@CUDA
def test_early_prefetch_gpu_same_results(monkeypatch):
    """With EARLY_PREFETCH (1 or 2 K steps), PDL launches of the 8B shapes (plain, gated, 1
    and 3 rows) in a CUDA graph give the same bits as without: the prefetch is only a hint
    to L2."""
    from kernels._triton import pdl_args, pdl_scope

    shapes = [(6144, 4096, False), (28672, 4096, True), (4096, 14336, False)]
    for m in (1, 3):
        for n, k, gated in shapes:
            x, w, _ = _inputs(m, n, k, torch.bfloat16, "cuda")
            outs = {}
            for early in (0, 1, 2):
                monkeypatch.setattr(kernels.gemv, "EARLY_PREFETCH", early)
                with pdl_scope(True):
                    block_n, block_k, warps, _ = kernels.gemv._config(m, n // 2 if gated else n, k, gated)
                    chunks, span = kernels.gemv._prefetch_plan(pdl_args(x), w, k, block_k, warps, block_n)
                    assert (chunks > 0) == (early > 0), "the launch does not take the prefetch"
                    gemv(x, w, None, gated)  # compile outside the capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = gemv(x, w, None, gated)
                graph.replay()
                outs[early] = out.clone()
            assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0]), (m, n, k, gated)


def test_sweep_grid_and_budget(monkeypatch):
    """bench/gemv.py's sweep: every config once, BLOCK_K up to K's next power of two,
    REDUCE_EACH both ways only above 2 rows, no config whose threads would hold more than
    SWEEP_MAX_PER_THREAD values, in one seeded shuffled order; sweep_best keeps the fastest
    that beats the default, skips configs that fail, and stops at its budget."""
    import types

    import bench.gemv as bg

    full = 4 * 5 * 2  # BLOCK_N x BLOCK_K x warps
    g1, g4 = bg.sweep_grid(1, 4096), bg.sweep_grid(4, 576)
    assert len(g1) == len(set(g1)) and {c[3] for c in g1} == {False}
    assert [c for c in g1 if bg.per_thread(1, False, c) > 128] == []
    assert full - len(g1) == 1  # 8 x 4096 on 4 warps: 256 values a thread
    assert {c[1] for c in g4} == {256, 512, 1024} and {c[3] for c in g4} == {True, False}
    assert g1 == bg.sweep_grid(1, 4096) and g1 != sorted(g1)
    assert {c[1] for c in bg.sweep_grid(1, 14336)} == set(bg.SWEEP_BLOCK_K)
    assert (8, 4096, 8, False) in g1 and (8, 4096, 8, False) not in bg.sweep_grid(1, 4096, gated=True)
    assert (8, 4096, 4, True) not in bg.sweep_grid(4, 4096) and (8, 4096, 8, True) in bg.sweep_grid(4, 4096)
    assert bg.per_thread(1, False, (4, 1024, 4, False)) == 32  # the 1-row default

    times = {c: 10.0 + i for i, c in enumerate(g1)}
    fastest = g1[5]
    times[fastest] = 3.0
    broken = g1[2]

    def fake_graph_us(fns, reps, iters):
        if fns == broken:
            raise RuntimeError("out of resources")
        return times[fns]

    monkeypatch.setattr(bg, "graph_us", fake_graph_us)
    assert bg.sweep_best(lambda c: c, 5.0, g1, 60.0, "t") == (3.0, fastest, len(g1) - 1)
    assert bg.sweep_best(lambda c: c, 2.0, g1, 60.0, "t")[1] is None  # the default stays best
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(bg, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    assert bg.sweep_best(lambda c: c, 50.0, g1, 25.0, "t") == (10.0, g1[0], 2)  # 0, 10, 20 s in
