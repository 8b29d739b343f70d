"""Weight prefetch for captured decode steps: each GEMV's weight starts moving into L2 while
the short kernels before it run.

Design note. At batch 1 a decode step is a chain of GEMVs, each reading its whole weight
from HBM, with attention, norms and the activation between them; during those short
kernels HBM is nearly idle. Inside `active()`, as soon as a GEMV's launch is recorded, a side
stream waits for that GEMV to finish and then asks for the first `cap_bytes` of the next
GEMV's weight (kernels/prefetch.py). The side stream never writes anything the model reads,
so nothing on the main stream waits for it until `active()` ends, which joins the two (a
CUDA graph must end on the stream it began on). The order of the GEMVs is the model's:
per layer qkv, o, gate_up, down; then the LM head.

Hooks are installed on entering `active()` and removed on leaving it, so eager steps and
every other forward pay nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import nn

# kernels.prefetch is imported where a prefetch is set up: importing kernels fixes
# TRITON_INTERPRET for the process (engine.layers.TritonOps), and configs are parsed on CPU
MODES = ("bulk", "loads")  # kernels.prefetch.MODES


def gemv_order(model: nn.Module) -> list[nn.Module]:
    """The linear layers of a dense decoder (engine.models.decoder.DecoderModel) in the order a
    decode step runs them. Raises ValueError for a model without that layout (MoE)."""
    order = []
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if not (hasattr(mlp, "gate_up") and hasattr(mlp, "down")):
            raise ValueError(f"weight prefetch needs dense MLP layers; layer {i} is {type(mlp).__name__}")
        order += [layer.attn.qkv, layer.attn.o, mlp.gate_up, mlp.down]
    return order + [model.lm_head]


def weight_bytes(module: nn.Module) -> torch.Tensor:
    """The memory a linear layer's GEMV reads, as a contiguous tensor: its weight, or the
    [in, out] block under a transposed view (engine.layers.CPULinear)."""
    w = module.weight
    if w.is_contiguous():
        return w
    if w.dim() == 2 and w.t().is_contiguous():
        return w.t()
    raise ValueError(f"weight prefetch needs contiguous weights; {type(module).__name__} has "
                     f"strides {tuple(w.stride())}")


class WeightPrefetcher:
    """The prefetch of one model's GEMV weights, for forwards run inside `active()`."""

    def __init__(self, model: nn.Module, cap_bytes: int, mode: str = "bulk",
                 programs: int = 16) -> None:
        """cap_bytes: at most this much of each weight is prefetched (its first bytes)."""
        if mode not in MODES:
            raise ValueError(f"prefetch mode must be one of {MODES}, got {mode!r}")
        if cap_bytes < 0 or programs < 1:
            raise ValueError(f"need cap_bytes >= 0 and programs >= 1, got {cap_bytes}, {programs}")
        from kernels.prefetch import bulk_supported, l2_prefetch

        self._launch = l2_prefetch
        device = model.lm_head.weight.device
        if mode == "bulk" and not bulk_supported(device):
            raise ValueError(f"bulk weight prefetch needs a CUDA GPU of compute capability 9.0+, "
                             f"not {device}")
        self.order = gemv_order(model)
        align = 16 if mode == "bulk" else 4  # the bulk unit; a 32-bit word
        for m in self.order:  # refused here, not by a hook in the middle of a capture
            if weight_bytes(m).data_ptr() % align:
                raise ValueError(f"{mode} weight prefetch needs {align}-byte aligned weights; "
                                 f"a {type(m).__name__} weight is not")
        self.cap_bytes, self.mode, self.programs = cap_bytes, mode, programs
        # module -> the weight prefetched once it has run; the first is asked for on entry
        self.next = {id(a): weight_bytes(b) for a, b in zip(self.order, self.order[1:])}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # "loads" writes its per-program sums here (allocated once, outside any capture)
        self._sums = torch.zeros(programs, dtype=torch.int32, device=device) if mode == "loads" else None
        self.issued = 0  # prefetches launched (tests)

    def nbytes(self, weight: torch.Tensor) -> int:
        """Bytes asked for of `weight`: the cap or all of it, in whole 16-byte units."""
        n = min(self.cap_bytes, weight.numel() * weight.element_size())
        return n - n % 16

    def _prefetch(self, weight: torch.Tensor) -> None:
        n = self.nbytes(weight)
        if n < 16:
            return
        side = self.stream
        ctx = contextlib.nullcontext()
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))  # after the GEMV just launched
            ctx = torch.cuda.stream(side)
        with ctx:
            self._launch(weight, n, self.mode, self.programs, out=self._sums)
        self.issued += 1

    def _after(self, module: nn.Module, _inputs, _output) -> None:
        weight = self.next.get(id(module))
        if weight is not None:
            self._prefetch(weight)

    @contextlib.contextmanager
    def active(self) -> Iterator[WeightPrefetcher]:
        """Forwards inside prefetch each next weight as described above; on leaving, the
        current stream waits for the side stream."""
        handles = [m.register_forward_hook(self._after) for m in self.order[:-1]]
        try:
            self._prefetch(weight_bytes(self.order[0]))
            yield self
        finally:
            for h in handles:
                h.remove()
            if self.stream is not None:
                torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


MIB = 1 << 20
# EngineConfig.weight_prefetch = "auto" without MINIINFER_WEIGHT_PREFETCH in the
# environment: the bulk prefetch of up to AUTO_CAP of each weight, on GPUs that have it,
# for models whose layers' weights are each at most AUTO_CAP (so a whole one sits in a
# small part of L2). On an H100 (bench/weight_prefetch.py, docs/PERF.md, seventeenth
# session) SmolLM2's shape (at most 3.4 MiB a weight) took 2% less time a replayed step
# and 3% less in the engine loop; the 8B shape (32-224 MiB) gained nothing at 4-16 MiB (2%
# slower on a second machine) and lost 7% at 32 MiB, where the prefetch runs past the short
# kernels into the next GEMV.
AUTO_CAP = 16 * MIB


def parse_setting(setting: str) -> tuple[str, int] | None:
    """A weight-prefetch setting -> (mode, cap in bytes), or None for "off".

    "off" | "bulk:CAP" | "loads:CAP", CAP in MiB (a number) or "all"; ValueError otherwise.
    ("auto" is resolved first, by `resolve`.)"""
    if setting == "off":
        return None
    mode, _, cap = setting.partition(":")
    if mode in MODES and cap:
        if cap == "all":
            return mode, 1 << 62
        try:
            mib = float(cap)
        except ValueError:
            mib = -1.0
        if mib > 0 and math.isfinite(mib):
            return mode, int(mib * MIB)
    raise ValueError(f"weight prefetch must be off, auto, bulk:CAP or loads:CAP (CAP in MiB or "
                     f"'all'), got {setting!r}")


def resolve(setting: str, model: nn.Module) -> tuple[str, int] | None:
    """EngineConfig.weight_prefetch for `model` (on its device) -> (mode, cap bytes) or None.
    auto: MINIINFER_WEIGHT_PREFETCH where set (to anything but auto); else bulk:AUTO_CAP on
    GPUs of compute capability 9.x (Hopper, where it was measured) for a dense model whose
    every layer weight is at most AUTO_CAP (the LM head is not counted: it gets its first
    AUTO_CAP like any weight); else off."""
    if setting == "auto":
        env = os.environ.get("MINIINFER_WEIGHT_PREFETCH", "").strip()
        if env and env != "auto":
            try:
                return parse_setting(env)
            except ValueError as e:
                raise ValueError(f"MINIINFER_WEIGHT_PREFETCH: {e}") from None
        device = model.lm_head.weight.device
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
            return None
        from kernels.prefetch import bulk_supported

        try:
            layers = gemv_order(model)[:-1]
        except ValueError:  # not a dense decoder
            return None
        largest = max(m.weight.numel() * m.weight.element_size() for m in layers)
        if not bulk_supported(device) or largest > AUTO_CAP:
            return None
        return "bulk", AUTO_CAP
    return parse_setting(setting)
