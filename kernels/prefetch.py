"""L2 prefetch: start moving (a prefix of) a tensor from HBM into the GPU's L2 cache.

A batch-1 decode step alternates GEMVs, which stream their weights from HBM, with short
kernels (attention, norms, activation) during which HBM sits nearly idle. Issued on a side
stream once a GEMV has finished (decode/prefetch.py), a prefetch of the next GEMV's weight
moves those bytes while the short kernels run; the GEMV then finds them in L2.

Two ways to ask:
- "bulk" (compute capability 9.0+): `cp.async.bulk.prefetch.L2.global`, one instruction a
  chunk. Nothing waits for the data: the kernel is done once its requests are issued, so it
  holds its SMs for microseconds whatever the size.
- "loads" (any GPU, and the interpreter): every 32-bit word loaded with the L2 policy
  evict_last and summed, one int32 sum a program written to `out` (so the compiler keeps
  the loads, and a test can check every word was read once). Its programs stay until the
  loads return.

A prefetch changes no value anywhere (but `out`); it is only a hint to the memory system.

Inside `ahead(t)`, a kernel launched with PDL that takes it (decode attention's reduce
kernel) asks L2 for t's first AHEAD_BYTES before its PDL wait: the decoder hands it the o
projection's weight, so those bytes move while the attention partitions run, the window
that the o GEMV's own early prefetch (kernels.gemv.EARLY_PREFETCH) cannot reach.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from kernels._triton import (
    check_launchable,
    device_guard,
    gpu_capability,
    kernel_op,
    tl,
    triton,
)

MODES = ("bulk", "loads")
_LANES = 32  # bulk: one chunk a thread, one warp a program
_BLOCK = 1024  # loads: words a program reads per iteration
# ahead(): bytes of the tensor asked for (its first ones; whole 16-byte units). 0: off, until
# a GPU has measured it
AHEAD_BYTES = 0
_AHEAD: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("miniinfer_ahead",
                                                                             default=None)


@triton.jit
def bulk_prefetch_l2(addr, nbytes):
    """Ask L2 for bytes [addr, addr + nbytes) of global memory, elementwise over the two
    tensors (int64 addresses, int32 sizes; both multiples of 16): one
    `cp.async.bulk.prefetch.L2.global` each, nothing waited for. Compute capability 9.0+,
    never in the interpreter. -> an int32 zero per element (the asm needs an output)."""
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r",
        [addr, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def prefetch_lanes(base, nbytes, chunk, lane):
    """Each lane i asks L2 for bytes [c, c + chunk) of [base, base + nbytes) (base an int64
    address), with c = i * chunk, cut at the end and to a multiple of 16 (the bulk
    instruction's unit). Lanes past the end re-ask for the first 16 bytes: harmless, and
    no branch."""
    off = lane.to(tl.int64) * chunk
    size = tl.minimum(nbytes - off, chunk)
    size = size - size % 16
    keep = size >= 16
    addr = tl.where(keep, base + off, base)  # int64 global addresses
    size = tl.where(keep, size, 16).to(tl.int32)
    bulk_prefetch_l2(addr, size)


@triton.jit
def _bulk_prefetch_kernel(base, nbytes, chunk, LANES: tl.constexpr):
    """Thread i of program p takes lane p * LANES + i of prefetch_lanes."""
    prefetch_lanes(base, nbytes, chunk, tl.program_id(0) * LANES + tl.arange(0, LANES))


@triton.jit
def _loads_prefetch_kernel(words_ptr, n_words, out_ptr, BLOCK: tl.constexpr):
    """Program p reads words p*BLOCK.., striding by the grid; writes their int32 sum
    (wrapping) to out[p]."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n_words, step):
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] word indices
        acc += tl.load(words_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def bulk_supported(device: torch.device) -> bool:
    """The bulk prefetch instruction exists here: a CUDA GPU of compute capability 9.0+
    (Hopper), not the interpreter (which runs no inline assembly); inside
    kernels.aot.compile_only, a target of 9.0+."""
    cap = gpu_capability(device)
    return cap is not None and cap >= (9, 0)


def _lane_chunk(nbytes: int, lanes: int) -> int:
    """Bytes a lane asks for when `lanes` share nbytes: whole 16-byte units (the bulk
    instruction's), rounded up so that the lanes cover all of it."""
    chunk = -(-nbytes // max(lanes, 1))
    return -(-chunk // 16) * 16


@contextlib.contextmanager
def ahead(t: torch.Tensor | None):
    """Kernels launched (or captured) inside that take it may ask L2 for t's first
    AHEAD_BYTES before their PDL wait (`ahead_plan`); None: nothing."""
    token = _AHEAD.set(t)
    try:
        yield
    finally:
        _AHEAD.reset(token)


def ahead_plan(device: torch.device, pdl: dict, lanes: int) -> tuple[int, int, int]:
    """(address, nbytes, chunk) of the prefetch a launch on `device` with `lanes` prefetching
    threads in all (its programs x threads) asks for before its PDL wait, from `ahead`'s
    tensor: each lane one chunk (`prefetch_lanes`); (0, 0, 0) for none. None unless
    AHEAD_BYTES is set, a tensor is ahead on that device, contiguous and 16-byte aligned,
    the launch has PDL (only then can it run before the kernel ahead of it ends) and the
    bulk instruction exists there."""
    t = _AHEAD.get()
    if not (AHEAD_BYTES > 0 and t is not None and pdl.get("PDL") and t.device == device
            and t.is_contiguous() and t.data_ptr() % 16 == 0 and bulk_supported(device)):
        return 0, 0, 0
    n = min(int(AHEAD_BYTES), t.numel() * t.element_size()) // 16 * 16
    if n < 16:
        return 0, 0, 0
    return t.data_ptr(), n, _lane_chunk(n, lanes)


def _prefix_bytes(name: str, t: torch.Tensor, nbytes: int | None) -> int:
    if not t.is_contiguous():
        raise ValueError(f"{name}: the tensor must be contiguous, got strides {tuple(t.stride())}")
    total = t.numel() * t.element_size()
    n = total if nbytes is None else int(nbytes)
    if not 0 <= n <= total:
        raise ValueError(f"{name}: nbytes must be in [0, {total}] for this tensor, got {nbytes}")
    return n


@kernel_op("l2_prefetch_loads", ("out",))
def _loads_op(words: torch.Tensor, n_words: int, out: torch.Tensor) -> None:
    with device_guard(words):
        _loads_prefetch_kernel[(out.numel(),)](words, n_words, out, BLOCK=_BLOCK)


# No outputs and nothing mutated: torch.compile could drop a call to this op as dead code.
# The engine calls it eagerly or under CUDA-graph capture, which record every launch.
@kernel_op("l2_prefetch_bulk")
def _bulk_op(t: torch.Tensor, nbytes: int, programs: int) -> None:
    chunk = _lane_chunk(nbytes, programs * _LANES)
    grid = -(-nbytes // (chunk * _LANES))
    with device_guard(t):
        _bulk_prefetch_kernel[(grid,)](t.data_ptr(), nbytes, chunk, LANES=_LANES, num_warps=1)


def l2_prefetch(t: torch.Tensor, nbytes: int | None = None, mode: str = "bulk",
                programs: int = 16, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Ask for t's first `nbytes` bytes (all of it when None) to be brought into L2.

    mode: "bulk" (needs `bulk_supported`) or "loads". programs: how many programs share
    the work (bulk: each issues up to 32 chunk requests). out: "loads" only, int32 [programs]
    for the per-program sums (allocated when None; pass one in under CUDA-graph capture to
    keep the allocation out of the graph) -> out; "bulk" -> None.
    """
    name = "l2_prefetch"
    if mode not in MODES:
        raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
    if programs < 1:
        raise ValueError(f"{name}: programs must be >= 1, got {programs}")
    n = _prefix_bytes(name, t, nbytes)
    if mode == "bulk":
        check_launchable(name, t)
        if not bulk_supported(t.device):
            raise ValueError(f"{name}: bulk prefetch needs a CUDA GPU of compute capability 9.0+ "
                             f"(and no TRITON_INTERPRET), not {t.device}; use mode='loads'")
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: bulk prefetch needs a 16-byte aligned tensor")
        if n >= 16:
            _bulk_op(t, n, programs)
        return None
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=t.device)
    check_launchable(name, t, out)
    if (out.dtype != torch.int32 or out.shape != (programs,) or not out.is_contiguous()):
        raise ValueError(f"{name}: out must be a contiguous int32 tensor of [programs] = "
                         f"[{programs}], got {out.dtype} {tuple(out.shape)}")
    if t.data_ptr() % 4 or n % 4:
        raise ValueError(f"{name}: loads read 32-bit words: the tensor must be 4-byte aligned "
                         f"and nbytes a multiple of 4, got {n}")
    words = t.view(-1).view(torch.uint8)[:n].view(torch.int32)  # [n / 4]
    if words.numel():
        _loads_op(words, words.numel(), out)
    else:
        out.zero_()
    return out


def loads_reference(t: torch.Tensor, nbytes: int | None = None) -> int:
    """What the "loads" mode's sums add up to: the int32 sum (wrapping) of t's first nbytes
    bytes read as little-endian words, as a Python int in [-2^31, 2^31)."""
    n = _prefix_bytes("loads_reference", t, nbytes)
    words = t.detach().reshape(-1).view(torch.uint8)[:n].view(torch.int32).cpu().to(torch.int64)
    return wrap_int32(int(words.sum()))


def wrap_int32(x: int) -> int:
    """x reduced to a signed 32-bit value, as int32 arithmetic wraps."""
    return (x + 2**31) % 2**32 - 2**31
