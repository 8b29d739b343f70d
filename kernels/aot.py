"""Compile-only runs: build the Triton kernels a GPU would run, on a machine without one.

Inside `compile_only()`, CPU tensors stand for GPU tensors of the target's compute
capability (sm_90, an H100 / H200, unless told otherwise): the wrappers choose the GPU's
launch configurations (tiles, warps, stages, PDL, FAST_I8, the bulk L2 prefetch; they ask
`kernels._triton.gpu_capability`), and every launch compiles its kernel for the target,
through Triton's front end and ptxas, and returns without running it. Outputs are left
as allocated (uninitialized), so only the launches matter, not the numbers.

What it catches before any device time is spent: kernels that compile under the CPU
interpreter but not for a GPU (a construct the code generator rejects, an inline-asm
branch the interpreter never takes), launch configurations that need more shared memory
than the GPU has, and register spills. `compile_only` records each distinct kernel built
(`Built`: registers, shared memory, stack frame and spill stores from `cuobjdump`,
compile time); `bench/compile_check.py` drives the engine's steps through it and prints the table.

It must run in a process where Triton was imported without TRITON_INTERPRET (the
interpreter replaces the compiler). Kernels get fresh per-device caches inside (so what a
GPU of this process compiled is neither reused for the target nor lost) and their own
back on leaving.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields

import torch

import kernels._triton as kt

# the most dynamic shared memory one program may use, by compute capability (bytes)
SHARED_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448,
                (10, 0): 232448, (12, 0): 101376}
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL_STORE = re.compile(r"\bSTL(\.[0-9A-Z]+)*\s")  # SASS stores to local memory: spills


class CompileCheckError(RuntimeError):
    """A kernel failed to build for the target, or built beyond what the target allows."""


@dataclass
class Built:
    """One kernel specialization compiled for the target."""

    kernel: str  # the @triton.jit function's name
    constants: dict  # its constexpr arguments (and Triton's specializations, e.g. ints of 1)
    num_warps: int
    num_stages: int
    shared: int  # dynamic shared memory a program needs, bytes
    seconds: float  # compile time (0 where Triton's cache had it)
    regs: int | None = None  # registers a thread (None: no cuobjdump to ask)
    stack: int | None = None  # stack frame bytes a thread (spills live there)
    spill_stores: int | None = None  # STL instructions in the SASS: registers spilled
    launches: int = 1  # launches in the run that asked for this specialization
    maxnreg: int | None = None  # the launch's register cap (Triton's maxnreg option), if any

    def record(self) -> dict:
        """For JSON: constexpr values as Python scalars or strings (dtypes by name)."""
        consts = {k: v if isinstance(v, (bool, int, float, str)) or v is None else _short(v)
                  for k, v in self.constants.items()}
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "constants": consts}

    def summary(self, width: int = 60) -> str:
        """The constexprs that tell specializations apart, shortened to `width`."""
        text = _constants_text(self.constants)
        return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class CompileRun:
    """What one `compile_only` block built, in launch order; `failures` holds the kernels
    that did not build (name, constexprs, error) when `raise_errors` is off."""

    capability: tuple[int, int]
    _by_hash: dict = field(default_factory=dict, repr=False)  # kernel hash -> Built
    _failed: dict = field(default_factory=dict, repr=False)  # (name, constexprs) -> failure

    @property
    def built(self) -> list[Built]:
        return list(self._by_hash.values())

    @property
    def failures(self) -> list[tuple[str, dict, str]]:
        return list(self._failed.values())

    def kernels(self) -> set[str]:
        return {b.kernel for b in self.built}

    def errors(self) -> list[str]:
        """What would fail on the GPU, one line each: builds that failed, and programs over
        the target's shared memory."""
        out = [f"{name} ({_constants_text(c)}): {err}" for name, c, err in self.failures]
        limit = SHARED_LIMIT.get(self.capability)
        if limit is not None:
            out += [f"{b.kernel} ({b.summary()}): {b.shared} bytes of shared memory, more than "
                    f"sm_{self.capability[0]}{self.capability[1]}'s {limit}"
                    for b in self.built if b.shared > limit]
        return out

    def spills(self) -> list[str]:
        """Specializations that spill registers (slower, not wrong), one line each."""
        return [f"{b.kernel} ({b.summary()}): {b.spill_stores} register spill stores "
                f"(a {b.stack}-byte stack frame) at {b.regs} registers"
                for b in self.built if b.spill_stores]

    def problems(self) -> list[str]:
        return self.errors() + self.spills()


def _short(v) -> str:
    name = getattr(v, "name", None)  # tl.dtype
    if name is not None and not isinstance(v, (bool, int, float, str)):
        return str(name)
    return "T" if v is True else "F" if v is False else str(v)


def _constants_text(constants: dict) -> str:
    return ",".join(f"{k}={_short(v)}" for k, v in constants.items())


def _constants(fn, src) -> dict:
    """ASTSource constants keyed by argument path -> {argument name: value}."""
    names = fn.arg_names
    out = {}
    for path, value in getattr(src, "constants", {}).items():
        index = path[0] if isinstance(path, tuple) else path
        if isinstance(index, int) and index < len(names):
            out[names[index]] = value
    return out


def _error_text(err: Exception) -> str:
    """One line for a build failure: ptxas's first error, or where the front end stopped
    and why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    ptxas = [line for line in lines if line.startswith("ptxas") and "error" in line]
    if ptxas:
        return f"{type(err).__name__}: {ptxas[0]}"
    if len(lines) > 1 and lines[0].startswith("at "):  # CompilationError: "at L:C:", source, cause
        return f"{type(err).__name__} {lines[0]} {lines[-1]}"
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes, tool: str | None) -> tuple[int, int, int] | None:
    """(registers, stack bytes, spill stores) a thread of the cubin's kernel, from
    `cuobjdump -res-usage` and the STL instructions of `cuobjdump -sass` (a stack frame
    alone may hold call frames; stores to it are spills); None without the tool."""
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (subprocess.run([tool, flag, f.name], capture_output=True, text=True,
                                      timeout=60).stdout for flag in ("-res-usage", "-sass"))
    found = _RES.search(usage)
    if found is None:
        return None
    regs, stack = int(found.group(1)), int(found.group(2))
    return regs, stack, len(_SPILL_STORE.findall(sass))


class _TargetDriver:
    """Stands in for Triton's CUDA driver: device 0, stream 0, the target to build for.
    Compile-only launches never reach the parts that talk to a GPU."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def compile_only(capability: tuple[int, int] = (9, 0), raise_errors: bool = True):
    """Launches inside compile their kernels for a CUDA GPU of `capability` instead of
    running them (CPU tensors stand for that GPU's). -> CompileRun, filled as launches
    happen. raise_errors: a kernel that fails to build raises CompileCheckError (naming
    the kernel and its constexprs) at its launch; off, failures are collected and the
    launch returns without building anything."""
    if not kt.HAS_TRITON:
        raise kt.TritonUnavailableError("compile_only needs the `triton` package")
    if kt.interpreting():
        raise CompileCheckError("compile_only needs a process started without TRITON_INTERPRET: "
                                "the interpreter replaces Triton's compiler")
    if kt._AOT_CAPABILITY is not None:
        raise CompileCheckError("compile_only blocks do not nest")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    run = CompileRun(tuple(capability))
    tool = _cuobjdump()
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    saved_caches: dict = {}  # kernel -> its own per-device caches, put back on leaving
    original = JITFunction.run

    def compile_launch(fn, *args, grid, warmup, **kwargs):
        if fn not in saved_caches:  # binders for the target, not for a GPU this process has
            saved_caches[fn] = fn.device_caches
            fn.device_caches = defaultdict(fn.create_binder)
        t0 = time.perf_counter()
        try:
            kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported with the kernel's name
            msg = _error_text(err)
            consts = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
            if raise_errors:
                raise CompileCheckError(f"{fn.fn.__name__} failed to build for sm_"
                                        f"{target.arch}: {msg}") from err
            # each launch of it tries again: report it once
            run._failed.setdefault((fn.fn.__name__, repr(sorted(consts.items()))),
                                   (fn.fn.__name__, consts, msg))
            return None
        seconds = time.perf_counter() - t0
        seen = run._by_hash.get(kernel.hash)
        if seen is not None:
            seen.launches += 1
            return kernel
        md = kernel.metadata
        built = Built(fn.fn.__name__, _constants(fn, kernel.src), md.num_warps, md.num_stages,
                      md.shared, seconds if seconds > 0.05 else 0.0,
                      maxnreg=getattr(md, "maxnreg", None))
        usage = resource_usage(kernel.asm["cubin"], tool)
        if usage is not None:
            built.regs, built.stack, built.spill_stores = usage
        run._by_hash[kernel.hash] = built
        return kernel

    previous = driver._active  # None until Triton first needs a driver (none on a CPU machine)
    driver.set_active(_TargetDriver(target))
    JITFunction.run = compile_launch
    kt._AOT_CAPABILITY = tuple(capability)
    try:
        yield run
    finally:
        kt._AOT_CAPABILITY = None
        JITFunction.run = original
        driver._active = previous
        for fn, caches in saved_caches.items():
            fn.device_caches = caches
