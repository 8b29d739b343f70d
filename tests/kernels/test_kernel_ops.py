"""The kernels as torch custom ops: registration, opcheck, torch.compile, import guards."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import kernels.ops as ops  # noqa: E402
from kernels.rmsnorm import _rmsnorm_op as rmsnorm_op  # noqa: E402
from kernels.rmsnorm import rmsnorm_reference  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parents[2]


def _paged_args(device, kv_dtype=torch.int8):
    data = torch.randn(2, 3, 16, 2, 16, device=device)
    scales = None
    if kv_dtype == torch.int8:
        scales = data.abs().amax(-1) / 127.0
        data = torch.round(data / scales.unsqueeze(-1)).to(torch.int8)
    tables = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32, device=device)
    return data, scales, tables


def _fused_decode_args(device):
    """rotary_store_decode_attention's op arguments: D32 over fp32 pages (tiles in halves
    on every device), tokens at positions 19 and 8, their slots from the tables
    [[2, 0], [1, 0]]."""
    data, scales = torch.randn(2, 3, 16, 2, 32, device=device), None
    tables = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32, device=device)
    kv = torch.randn(2, 2, 2, 32, device=device)
    return (torch.tensor([19, 8], device=device), torch.randn(2, 4, 32, device=device), kv[0],
            kv[1], torch.randn(32, 32, device=device), torch.randn(32, 32, device=device), data,
            scales, torch.tensor([3, 24], device=device), tables,
            torch.tensor([20, 9], device=device), 0.25, 16)


def _op_cases(device):
    x = torch.randn(3, 32, device=device)
    w = torch.randn(32, device=device)
    pos = torch.tensor([0, 4, 9], device=device)
    cos, sin = torch.randn(16, 16, device=device), torch.randn(16, 16, device=device)
    q, k = torch.randn(3, 4, 16, device=device), torch.randn(3, 2, 16, device=device)
    data, scales, tables = _paged_args(device)
    ctx = torch.tensor([20, 9], device=device)
    m = torch.ops.miniinfer
    return {
        "rmsnorm": (m.rmsnorm.default, (x, w, 1e-6)),
        "fused_add_rmsnorm": (m.fused_add_rmsnorm.default, (x, x.clone(), w, 1e-6)),
        "rotary_embedding": (m.rotary_embedding.default, (pos, q, k, cos, sin)),
        "rotary_embedding_": (m.rotary_embedding_.default, (pos, q.clone(), k.clone(), cos, sin)),
        "silu_and_mul": (m.silu_and_mul.default, (x,)),
        "store_kv": (
            m.store_kv.default,
            (k, k.clone(), data.clone(), scales.clone(), torch.tensor([5, -1, 40], device=device)),
        ),
        "rotary_store_kv": (
            m.rotary_store_kv.default,
            (pos, q.clone(), k, k.clone(), cos, sin, data.clone(), scales.clone(),
             torch.tensor([5, -1, 40], device=device)),
        ),
        "decode_attention": (
            m.decode_attention.default,
            (torch.randn(2, 4, 16, device=device), data, scales, tables, ctx, 0.25, 16),
        ),
        "rotary_store_decode_attention": (
            m.rotary_store_decode_attention.default,
            _fused_decode_args(device),
        ),
        "prefill_attention": (
            m.prefill_attention.default,
            (q, data, scales, tables, torch.tensor([0, 2, 3], device=device), ctx, 2, 0.25),
        ),
        "moe_route": (m.moe_route.default, (torch.randn(3, 8, device=device), 2, True)),
        "moe_gather_sum": (m.moe_gather_sum.default, (x, torch.tensor([[2, -1], [0, 0]], device=device),
                                                      torch.rand(2, 2, device=device))),
        "spec_verify": (m.spec_verify.default, (torch.randn(2, 3, 32, device=device),
                                                torch.tensor([[1, 2], [3, 4]], device=device),
                                                torch.tensor([2, 1], device=device),
                                                torch.tensor([0.0, 0.7], device=device),
                                                torch.softmax(torch.randn(2, 2, 32, device=device), -1),
                                                torch.rand(2, 3, device=device),
                                                torch.empty(2, 3, 32, device=device).exponential_())),
    }


def test_every_op_is_registered():
    for name in ops.OP_NAMES:
        assert hasattr(torch.ops.miniinfer, name), name


@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_opcheck(name, device):
    """Schema, fake (meta) implementation and functionalization agree with the real op."""
    op, args = _op_cases(device)[name]
    torch.library.opcheck(op, args)


def _layer_step(x, residual, weight, positions, cos, sin, q, k, data, scales, tables, ctx, slots):
    normed, residual = ops.fused_add_rmsnorm(x, residual, weight, 1e-6)
    q, k = ops.apply_rotary(positions, q, k, cos, sin)
    ops.store_kv(k, k, data, scales, slots)
    attn = ops.decode_attention(q, data, scales, tables, ctx, partition_size=16)
    return normed, residual, attn, ops.silu_and_mul(normed)


def _layer_inputs(device):
    data, scales, tables = _paged_args(device)
    return (
        torch.randn(2, 32, device=device),
        torch.randn(2, 32, device=device),
        torch.randn(32, device=device),
        torch.tensor([19, 8], device=device),
        torch.randn(32, 16, device=device),
        torch.randn(32, 16, device=device),
        torch.randn(2, 4, 16, device=device),
        torch.randn(2, 2, 16, device=device),
        data,
        scales,
        tables,
        torch.tensor([20, 9], device=device),
        torch.tensor([2 * 16 + 3, 1 * 16 + 8], device=device),
    )


def _check_compiled(device, backend):
    args = _layer_inputs(device)
    eager_args = [a.clone() for a in args]
    compiled = torch.compile(_layer_step, backend=backend, fullgraph=True)
    got, want = compiled(*args), _layer_step(*eager_args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(args[8], eager_args[8])  # the cache was written in both
    torch.testing.assert_close(args[9], eager_args[9])


def test_ops_trace_under_torch_compile(device):
    _check_compiled(device, "aot_eager")


def test_compiled_graph_holds_the_ops(device):
    """torch.compile sees each kernel as one opaque op (not its Triton launch)."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_layer_step, backend=record, fullgraph=True)(*_layer_inputs(device))
    m = torch.ops.miniinfer
    for op in (m.fused_add_rmsnorm, m.rotary_embedding, m.store_kv, m.decode_attention, m.silu_and_mul):
        assert op.default in targets, op


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher(device, monkeypatch):
    """A plain eager call runs the kernel directly (the custom-op layer costs host time on
    every call); under a dispatch mode the op runs, by name too."""
    calls = []

    def spy(*args):
        calls.append(args)
        return torch.ops.miniinfer.rmsnorm(*args)

    monkeypatch.setattr(rmsnorm_op, "op", spy)
    x, w = torch.randn(3, 32, device=device), torch.randn(32, device=device)
    got = ops.rmsnorm(x, w, 1e-6)
    assert calls == []
    torch.testing.assert_close(got, rmsnorm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    with _OpNames() as seen:
        ops.rmsnorm(x, w, 1e-6)
    assert len(calls) == 1 and "miniinfer.rmsnorm.default" in seen.names


def test_what_the_dispatcher_must_see_takes_the_op(device):
    """Meta tensors get the fake impl, inputs that need grad get the op's autograd node (a
    backward raises), and a direct call still bumps the version of what the op mutates
    (outside inference mode)."""
    x, w = torch.randn(3, 32, device=device), torch.randn(32, device=device)
    out = rmsnorm_op(x.to("meta"), w.to("meta"), 1e-6)  # past the wrapper, which wants a device
    assert out.is_meta and out.shape == (3, 32)
    out = ops.rmsnorm(x.clone().requires_grad_(), w, 1e-6)
    assert out.requires_grad  # the op's autograd node (which has no backward formula)
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()
    data, scales, _ = _paged_args(device)
    k = torch.randn(3, 2, 16, device=device)
    before = data._version, scales._version
    ops.store_kv(k, k.clone(), data, scales, torch.tensor([5, -1, 40], device=device))
    assert data._version > before[0] and scales._version > before[1]
    with _OpNames() as seen:  # under a dispatch mode the op is what runs
        ops.silu_and_mul(x)
    assert "miniinfer.silu_and_mul.default" in seen.names


def test_fake_tensors_go_through_the_op(device):
    """Tensor subclasses (FakeTensor while tracing) take the registered op and its fake impl."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(5, 64, device=device), torch.empty(64, device=device)
        out, res = ops.fused_add_rmsnorm(x, x, w, 1e-6)
    assert isinstance(out, FakeTensor) and out.shape == (5, 64) and res.shape == (5, 64)


def test_cpu_tensors_without_interpreter_raise(device, monkeypatch):
    if device != "cpu":
        pytest.skip("only meaningful without CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ops.rmsnorm(torch.randn(2, 8), torch.ones(8))


def test_import_without_triton_raises_only_on_call():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels.ops as ops\n"
        "from kernels._triton import HAS_TRITON, TritonUnavailableError\n"
        "assert not HAS_TRITON\n"
        "try:\n"
        "    ops.rmsnorm(torch.ones(2, 8), torch.ones(8))\n"
        "except TritonUnavailableError as e:\n"
        "    print('raised:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "raised: rmsnorm: this kernel needs the `triton` package" in res.stdout


@pytest.mark.gpu
@CUDA
def test_ops_under_inductor_gpu():
    _check_compiled("cuda", "inductor")


def test_pdl_only_on_hopper_cuda_and_only_while_enabled(monkeypatch):
    """pdl_args gates programmatic dependent launch: CUDA devices of capability 9.0+ get the
    launch flag and the kernel's PDL branch; CPU, the interpreter, older GPUs and
    PDL_ENABLED = False launch the ordinary way."""
    import types

    import kernels._triton as kt

    on, off = {"PDL": True, "launch_pdl": True}, {"PDL": False}
    monkeypatch.setattr(kt, "PDL_ENABLED", True)
    assert kt.pdl_args(torch.empty(1)) == off
    gpu = types.SimpleNamespace(device=torch.device("cuda", 3))
    monkeypatch.setattr(kt, "_INTERPRETER", False)  # as on a GPU machine (CI runs the interpreter)
    for cap, want in (((9, 0), on), ((10, 0), on), ((8, 9), off)):
        monkeypatch.setattr(kt, "_capability", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, cap=cap: cap)
        assert kt.pdl_args(gpu) == want, cap
    monkeypatch.setattr(kt, "_capability", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert kt.pdl_args(gpu) == on
    monkeypatch.setattr(kt, "_INTERPRETER", True)  # no PDL in the interpreter, CUDA tensors or not
    assert kt.pdl_args(gpu) == off
    monkeypatch.setattr(kt, "_INTERPRETER", False)
    monkeypatch.setattr(kt, "PDL_ENABLED", False)
    assert kt.pdl_args(gpu) == off


def test_pdl_scope_overrides_the_switch(monkeypatch):
    """pdl_scope(True / False) decides for the launches inside it, whatever PDL_ENABLED
    says; None, and leaving the scope, give PDL_ENABLED back."""
    import types

    import kernels._triton as kt

    on, off = {"PDL": True, "launch_pdl": True}, {"PDL": False}
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(kt, "_INTERPRETER", False)
    monkeypatch.setattr(kt, "_HAS_PDL", True)
    monkeypatch.setattr(kt, "_capability", {0: (9, 0)})
    for enabled in (False, True):
        monkeypatch.setattr(kt, "PDL_ENABLED", enabled)
        with kt.pdl_scope(True):
            assert kt.pdl_args(gpu) == on
            with kt.pdl_scope(False):
                assert kt.pdl_args(gpu) == off
            with kt.pdl_scope(None):
                assert kt.pdl_args(gpu) == (on if enabled else off)
            assert kt.pdl_args(gpu) == on
        assert kt.pdl_args(gpu) == (on if enabled else off)
        with kt.pdl_scope(True):
            assert kt.pdl_args(torch.empty(1)) == off  # never on CPU
    monkeypatch.setattr(kt, "_HAS_PDL", False)  # a Triton without gdc_wait: never
    with kt.pdl_scope(True):
        assert kt.pdl_args(gpu) == off


@pytest.mark.parametrize("value, want", [("0", False), ("", False), ("1", True), ("on", True)])
def test_pdl_switch_from_the_environment(value, want):
    import kernels._triton as kt

    code = "import kernels._triton as kt; print(kt.PDL_ENABLED)"
    env = {**os.environ, "MINIINFER_PDL": value}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == str(want and kt._triton_has_pdl())


@pytest.mark.parametrize("value, want", [(None, True), ("", True), ("0", False), ("off", False),
                                         ("1", True)])
def test_fused_decode_store_switch_from_the_environment(value, want):
    """On unless MINIINFER_FUSE_ROTARY_STORE says 0 / false / off / no."""
    code = "import kernels.decode_attention as da; print(da.FUSE_ROTARY_STORE)"
    env = {k: v for k, v in os.environ.items() if k != "MINIINFER_FUSE_ROTARY_STORE"}
    if value is not None:
        env["MINIINFER_FUSE_ROTARY_STORE"] = value
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == str(want)


def test_pdl_switch_ignored_with_a_warning_on_a_triton_without_it():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import triton.language.extra.cuda as c; del c.gdc_wait  # as an older Triton\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import kernels._triton as kt\n"
            "print(kt.PDL_ENABLED, any('MINIINFER_PDL=1 ignored' in str(x.message) for x in w))")
    env = {**os.environ, "MINIINFER_PDL": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    assert out == "False True"
