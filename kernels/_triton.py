"""The guarded Triton import and the checks every kernel wrapper shares.

Kernel files import `triton` and `tl` from here, never directly, so that `import kernels.xxx`
works where Triton is not installed (CPU-only aarch64 wheels, minimal images): the kernels
are then stubs that raise `TritonUnavailableError` when launched, and the wrappers raise it
before they launch.
"""

import contextlib
import contextvars
import inspect
import os
import types
import warnings

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # only the launch needs triton; defining the kernels must not
    HAS_TRITON = False


class TritonUnavailableError(RuntimeError):
    """Raised when a kernel is called but the `triton` package cannot be imported."""


_NO_TRITON = (
    "this kernel needs the `triton` package, which is not installed here; "
    "install it (pip install triton) or use the torch reference path"
)

if not HAS_TRITON:

    class _MissingKernel:
        """Stands in for a @triton.jit function; launching it raises."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise TritonUnavailableError(_NO_TRITON)

        def __call__(self, *args, **kwargs):
            raise TritonUnavailableError(_NO_TRITON)

    def _jit(fn=None, **_kwargs):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    def _unavailable(*_args, **_kwargs):
        raise TritonUnavailableError(_NO_TRITON)

    # only what kernel definitions touch at import time: decorators and annotations
    triton = types.SimpleNamespace(jit=_jit, cdiv=_unavailable, next_power_of_2=_unavailable)
    tl = types.SimpleNamespace(constexpr=object)


def _env_flag(name: str, default: bool = False) -> bool:
    """An on/off switch from the environment: 1, true, on or yes (any case) mean on; 0,
    false, off or no mean off; unset (or anything else) means `default`."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    return False if value in ("0", "false", "off", "no") else default


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return _env_flag("TRITON_INTERPRET")


# Programmatic dependent launch (PDL, Hopper and later). Launches inside `pdl_scope(True /
# False)` follow the scope: an engine's forward opens one (engine.llm.EngineConfig.pdl,
# which by default takes PDL for wide models only). Outside any scope, or in a None scope
# (EngineConfig.pdl = auto while MINIINFER_PDL is set), PDL is off unless MINIINFER_PDL=1
# is in the environment (or PDL_ENABLED is set True). A kernel launched with it may be scheduled while
# the kernel before it on the stream still runs; it waits for that kernel's completion (and
# its writes) in `pdl_wait`, which every PDL kernel calls before it touches memory. A chain
# of short Triton kernels in a CUDA graph ran 0.71 us a kernel instead of 1.14 on an H200,
# but whole decode steps gained on the 8B shape (replay 1.4-2.7% faster) and mostly not on
# SmolLM2 (up to 9% slower at batch 32), where cuBLAS kernels sit between most of ours
# (docs/PERF.md, tenth and fifteenth sessions). It needs a Triton with the device-side calls
# (`tl.extra.cuda.gdc_wait`; 3.6 and 3.9 have them); with an older one the switch is ignored.
def _triton_has_pdl() -> bool:
    try:
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")


PDL_ENABLED = _env_flag("MINIINFER_PDL")
_HAS_PDL = HAS_TRITON and _triton_has_pdl()
if PDL_ENABLED and not _HAS_PDL:
    warnings.warn("MINIINFER_PDL=1 ignored: this Triton has no programmatic dependent launch "
                  "(tl.extra.cuda.gdc_wait)", stacklevel=1)
    PDL_ENABLED = False
# an engine's own choice for the kernels it launches (pdl_scope); None defers to PDL_ENABLED
_PDL_SCOPE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("miniinfer_pdl", default=None)
_INTERPRETER = interpreting()  # as Triton, which reads TRITON_INTERPRET when kernels are defined
_NO_PDL = {"PDL": False}
# compile-only runs (kernels/aot.py): CPU tensors stand for GPU ones of this capability, so
# the wrappers pick the GPU's launch configs and Triton builds for that GPU, launching nothing
_AOT_CAPABILITY: tuple[int, int] | None = None
_WITH_PDL = {"PDL": True, "launch_pdl": True}
_capability: dict[int, tuple[int, int]] = {}


@contextlib.contextmanager
def pdl_scope(enabled: bool | None):
    """Kernels launched inside (and captured into CUDA graphs inside) take programmatic
    dependent launch if `enabled`, not if False; None leaves it to PDL_ENABLED. Where PDL
    cannot run (no Triton support, CPU, the interpreter, pre-Hopper GPUs) nothing changes."""
    token = _PDL_SCOPE.set(enabled)
    try:
        yield
    finally:
        _PDL_SCOPE.reset(token)


def gpu_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability launches on `device` are built for: the CUDA device's, the
    compile-only target's for CPU tensors inside kernels.aot.compile_only, else None (CPU
    and the interpreter, which take the small tiles). Every launch-config choice that
    differs between GPU and CPU asks this."""
    if device.type == "cuda" and not _INTERPRETER:
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _capability.get(index)
        if cap is None:
            cap = _capability[index] = torch.cuda.get_device_capability(index)
        return cap
    if device.type == "cpu" and _AOT_CAPABILITY is not None:
        return _AOT_CAPABILITY
    return None


def pdl_args(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking `PDL: tl.constexpr`: PDL on CUDA devices of
    compute capability 9.0+ while enabled (the pdl_scope around the launch, else
    PDL_ENABLED), never in the interpreter or on CPU."""
    enabled = _PDL_SCOPE.get()
    if enabled is None:
        enabled = PDL_ENABLED
    if not enabled or not _HAS_PDL:
        return _NO_PDL
    cap = gpu_capability(t.device)
    return _WITH_PDL if cap is not None and cap >= (9, 0) else _NO_PDL


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """First statement of a kernel launched through `pdl_args`: wait for the previous kernel
    to finish (nothing of this kernel may read or write memory before), then let the next
    one be scheduled (it waits for this one the same way)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error before a launch that could only fail obscurely inside Triton."""
    if not HAS_TRITON:
        raise TritonUnavailableError(f"{name}: {_NO_TRITON}")
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(
                f"{name}: all tensors must be on one device, got {device} and {t.device}"
            )
    if device.type == "cpu" and not interpreting() and _AOT_CAPABILITY is None:
        raise ValueError(
            f"{name}: Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
            "in the environment before triton is first imported"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{name}: unsupported device {device}; expected cuda (or cpu + interpreter)"
        )


def check_last_dim_contiguous(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name}: {arg} must be contiguous in its last dimension (stride 1), "
                f"got strides {tuple(t.stride())}; call .contiguous() first"
            )


def check_float(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: {arg} must be float32, float16 or bfloat16, got {t.dtype}")


def check_index(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: {arg} must be int32 or int64, got {t.dtype}")


def device_guard(t: torch.Tensor):
    """Launch on t's GPU even when another one is current (Triton uses the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class KernelOp:
    """A kernel registered as the torch custom op `miniinfer::<name>`, with a direct eager path.

    torch.compile (and anything calling `torch.ops.miniinfer.<name>`) goes through the op. A
    plain eager call runs the implementation directly: the custom-op dispatch layer costs
    host time on every call under torch 2.11 (eager prefill steps on H200 machines were
    1.08-1.16x faster direct in the latest runs, up to 1.45x in one; docs/PERF.md, ninth
    session). CUDA-graph capture records the same kernels either way.

    Anything the dispatcher must see still takes the op: tracing, tensor subclasses
    (FakeTensor), meta tensors, active torch-function / dispatch modes, keyword arguments,
    and inputs that require grad while grad is on (the op gives the output an autograd node
    whose backward raises: the kernels have none). Direct calls bump the version counter of
    the arguments the op declares mutated, as the op does.
    """

    def __init__(self, name: str, fn, mutates_args: tuple[str, ...]) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(f"miniinfer::{name}", fn, mutates_args=mutates_args)
        params = list(inspect.signature(fn).parameters)
        self._mutated = [params.index(a) for a in mutates_args]

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def _direct(self, args) -> bool:
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()):
            return False
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, torch.Tensor) and (
                type(a) is not torch.Tensor or a.is_meta or (grad and a.requires_grad)
            ):
                return False
        return True

    def __call__(self, *args, **kwargs):
        if kwargs or not self._direct(args):
            return self.op(*args, **kwargs)
        out = self.fn(*args)
        for i in self._mutated:
            a = args[i] if i < len(args) else None
            if a is not None and not a.is_inference():
                torch.autograd.graph.increment_version(a)
        return out


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Decorator: register fn as `miniinfer::<name>` -> a KernelOp."""
    return lambda fn: KernelOp(name, fn, mutates_args)


__all__ = [
    "HAS_TRITON",
    "KernelOp",
    "TritonUnavailableError",
    "check_float",
    "check_index",
    "check_last_dim_contiguous",
    "check_launchable",
    "device_guard",
    "gpu_capability",
    "interpreting",
    "kernel_op",
    "pdl_args",
    "pdl_scope",
    "pdl_wait",
    "tl",
    "triton",
]
