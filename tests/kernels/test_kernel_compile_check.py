"""Compile-only runs (kernels/aot.py, bench/compile_check.py): every Triton kernel the
engine launches on a GPU builds for sm_90 here, on a machine without one.

The CPU suite runs the kernels through Triton's interpreter, which never compiles them
and never takes their GPU-only branches (FAST_I8's inline assembly, PDL, the bulk L2
prefetch, the wide tiles). These tests build them the way a GPU would, with the engine's
GPU launch choices, in subprocesses started without TRITON_INTERPRET. `make test` puts
the GPU image's Triton (3.6.0) first on their path through MINIINFER_GPU_TRITON, since
Triton versions differ in what they accept (a str constexpr default in a helper built
under 3.9 here and failed under 3.6 on the GPU); without it they build with the
installed Triton.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


# the engine's switches, which would change what its steps launch
KNOBS = ("TRITON_INTERPRET", "MINIINFER_PDL", "MINIINFER_GEMV", "MINIINFER_FUSE_ROTARY_STORE",
         "MINIINFER_WEIGHT_PREFETCH")


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    paths = [os.environ.get("MINIINFER_GPU_TRITON", ""), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # cold: every kernel is built
    return env


def _launched_kernels() -> set[str]:
    """Every `@triton.jit def _name_kernel(` in kernels/: what a GPU may launch."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    return names


def test_every_engine_kernel_builds_for_hopper(tmp_path):
    """bench/compile_check.py at both bench shapes (two layers, a small vocabulary): every
    kernel of kernels/ builds, within sm_90's shared memory, and the GPU's launch choices
    were the ones built (FAST_I8 int8 tiles, PDL on for the 8B shape only, 128-row prefill
    tiles, the fused gated GEMV), as were the decode tile options only TUNING takes."""
    out = tmp_path / "built.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_check.py"), "--vocab", "8192",
         "--json", str(out)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    print(f"built with Triton {report['triton']}")
    gpu_triton = os.environ.get("MINIINFER_GPU_TRITON", "")
    if gpu_triton and (Path(gpu_triton) / "triton").is_dir():  # make test: the GPU image's
        assert Path(report["triton_file"]).is_relative_to(Path(gpu_triton).resolve())
    assert report["failures"] == []
    assert [p for p in report["problems"] if "spill stores" not in p] == []  # spills: warnings
    built = report["built"]
    assert {b["kernel"] for b in built} == _launched_kernels()
    assert all(b["regs"] and 0 < b["regs"] <= 255 for b in built)  # cuobjdump read each cubin

    def consts(kernel):
        return [b["constants"] for b in built if b["kernel"] == kernel]

    partitions = consts("_decode_partition_kernel")
    assert any(c["QUANTIZED"] and c["FAST_I8"] and c["PARTITION_SIZE"] == 512 for c in partitions)
    engine = [c for c in partitions if c["ROTARY"]]  # decode steps: the store fused in
    assert {(c["GROUP"], c["PDL"]) for c in engine} == {(3, False), (4, True)}  # SmolLM2, 8B
    tile_options = {(c["FAST_I8"], c["I8_QK"], c["LAZY"]) for c in partitions
                    if c["QUANTIZED"] and c["PARTITION_SIZE"] == 512}
    assert len(tile_options) == 8  # tuning_variants: every combination the GPU tests take
    assert any(c["BLOCK_M"] == 128 for c in consts("_prefill_kernel"))
    gemv = consts("_gemv_kernel")
    assert any(c["GATED"] for c in gemv) and any(c["REDUCE_EACH"] for c in gemv)
    assert {c["GATED"] for c in gemv if c["NORM"]} == {True, False}  # SmolLM2: qkv and gate_up
    assert {c["NORM"] for c in gemv} == {0, 1, 2, 3}  # 3: the split with SPLIT_SCALE_AFTER
    # kernels.gemv.SPLIT_MAXNREG reaches the compiler: the split's gate_up built under its cap
    capped = [b for b in built if b["kernel"] == "_gemv_kernel" and b["maxnreg"]]
    assert [(b["maxnreg"], b["constants"]["NORM"], b["constants"]["GATED"]) for b in capped] == [(80, 2, True)]
    assert capped[0]["regs"] <= 80
    assert {c["LANES"] for c in consts("_bulk_prefetch_kernel")} == {32}
    assert {c["AHEAD"] > 0 for c in consts("_decode_reduce_kernel")} == {True, False}  # o ahead


BAD_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def asm_kernel(x_ptr, n, GPU_ONLY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if GPU_ONLY:  # a branch the interpreter never takes; ptxas rejects it
        x = tl.inline_asm_elementwise("not.an.instruction $0, $1;", "=r,r", [x],
                                      dtype=tl.int32, is_pure=True, pack=1)
    tl.store(x_ptr + offs, x, mask=offs < n)


@triton.jit
def big_tile_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(0, K, BK):
        a = tl.load(a_ptr + m[:, None] * K + (s + k)[None, :])
        b = tl.load(b_ptr + (s + k)[:, None] * BN + n[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + m[:, None] * BN + n[None, :], acc)
'''

PROBE = '''
import json, sys
import torch
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import bad_kernels as bad
import kernels._triton as kt
from kernels.aot import CompileCheckError, compile_only

run_before, driver_before = JITFunction.run, driver._active
caches_before = bad.asm_kernel.device_caches
x = torch.zeros(64, dtype=torch.int32)
a = torch.zeros(256, 1024, dtype=torch.bfloat16)
b = torch.zeros(1024, 256, dtype=torch.bfloat16)
c = torch.zeros(256, 256)
with compile_only(raise_errors=False) as run:
    bad.asm_kernel[(1,)](x, 64, GPU_ONLY=False, BLOCK=64)
    bad.asm_kernel[(1,)](x, 64, GPU_ONLY=True, BLOCK=64)
    bad.asm_kernel[(1,)](x, 64, GPU_ONLY=True, BLOCK=64)  # tried again, reported once
    bad.asm_kernel[(1,)](x, 64, GPU_ONLY=False, BLOCK=64)
    bad.big_tile_kernel[(1,)](a, b, c, 1024, BM=256, BN=256, BK=128, num_stages=4, num_warps=8)
raised = None
try:
    with compile_only():
        bad.asm_kernel[(1,)](x, 64, GPU_ONLY=True, BLOCK=64)
except CompileCheckError as err:
    raised = str(err)
print(json.dumps({
    "built": [[b.kernel, b.launches, b.shared] for b in run.built],
    "failures": [[k, e] for k, _, e in run.failures],
    "problems": run.problems(),
    "raised": raised,
    "restored": [JITFunction.run is run_before, driver._active is driver_before,
                 kt._AOT_CAPABILITY is None, bad.asm_kernel.device_caches is caches_before,
                 not caches_before],
}))
'''


def test_compile_only_reports_what_a_gpu_cannot_build(tmp_path):
    """A GPU-only branch that ptxas rejects fails (with ptxas's error; raised, or collected
    once while the other specializations build), a tile over sm_90's shared memory is
    flagged, repeated launches count against one build, and leaving the block puts Triton
    back (the kernel's own per-device caches untouched)."""
    (tmp_path / "bad_kernels.py").write_text(textwrap.dedent(BAD_KERNELS))
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    env = _env(tmp_path)
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    proc = subprocess.run([sys.executable, str(tmp_path / "probe.py")], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["built"][0][:2] == ["asm_kernel", 2]  # GPU_ONLY=False, launched twice
    assert [b[0] for b in got["built"]] == ["asm_kernel", "big_tile_kernel"]
    assert len(got["failures"]) == 1 and got["failures"][0][0] == "asm_kernel"
    assert "ptxas" in got["failures"][0][1] and "error" in got["failures"][0][1]
    assert got["raised"].startswith("asm_kernel failed to build for sm_90")
    big = got["built"][1][2]
    assert big > 232448
    assert any(f"{big} bytes of shared memory" in p for p in got["problems"])
    assert all(got["restored"])


def test_compile_only_refuses_the_interpreter():
    """This process runs the interpreter (tests/kernels/conftest.py): nothing to compile."""
    from kernels.aot import CompileCheckError, compile_only

    with pytest.raises(CompileCheckError, match="TRITON_INTERPRET"):
        with compile_only():
            pass


@pytest.mark.parametrize("args,env_extra,message", [
    (["--shapes", "nope"], {}, "unknown shapes ['nope']"),
    (["--arch", "hopper"], {}, "--arch must be a compute capability"),
    ([], {"TRITON_INTERPRET": "1"}, "unset TRITON_INTERPRET"),
])
def test_compile_check_cli_rejects_bad_input(args, env_extra, message, tmp_path):
    env = _env(tmp_path) | env_extra
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py"), *args],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
