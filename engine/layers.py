"""Building blocks of the decoder: RMSNorm, rotary embedding, gated MLP.

The modules hold parameters; the math goes through a `LayerOps` object chosen once per
engine: `TorchOps` (the reference, what CPU runs) or `TritonOps` (kernels/, CUDA). Both
take the same arguments, so the model code has one path.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: LayerOps | None = None) -> torch.Tensor:
        return (ops or TORCH_OPS).rmsnorm(x, self.weight, self.eps)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, smoothly blended."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, blended, out)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling and scaling.get("rope_type") == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ops=None):
        """positions [T]; q [T, H, D], k [T, Hkv, D] -> rotated q, k (same dtypes)."""
        return (ops or TORCH_OPS).rotary(positions, q, k, self.cos, self.sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


# Inside gemv_scope(n) (engine.backend.Backend.launches on the Triton backend), `Linear`
# layers multiply inputs of at most n rows with kernels/gemv.py instead of cuBLAS; 0 = never.
_GEMV_ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("miniinfer_gemv_rows", default=0)
_gemv = None  # kernels.gemv, imported on first use (importing kernels fixes TRITON_INTERPRET)


def _gemv_module():
    global _gemv
    if _gemv is None:
        import kernels.gemv as module

        _gemv = module
    return _gemv


@contextlib.contextmanager
def gemv_scope(max_rows: int):
    """`Linear` layers called inside (and captured into CUDA graphs inside) send inputs of at
    most max_rows rows (<= kernels.gemv.MAX_ROWS) through the Triton GEMV; 0 turns it off."""
    token = _GEMV_ROWS.set(max_rows)
    try:
        yield
    finally:
        _GEMV_ROWS.reset(token)


class RowSums(NamedTuple):
    """Handed on as a layer's `residual` where its `x` already holds the residual stream: the
    GEMV that made x (Linear(..., residual=) -> kernels.gemv.gemv_add) added the residual in
    and left `sums`, the per-program sums of squares of x's rows, from which the next GEMV
    normalizes x (Linear(..., norm=(RowSums, ...)) -> gemv_rmsnorm_sums). Rows too wide for
    one GEMV to normalize alone (kernels.gemv.splits_norm) take this path."""

    sums: torch.Tensor


def add_rmsnorm(ops: LayerOps, x: torch.Tensor, residual, norm: RMSNorm):
    """ops.add_rmsnorm(x, residual, ...) -> (rmsnorm(x + residual), x + residual), where
    residual may be RowSums (x is then the stream itself)."""
    if isinstance(residual, RowSums):
        return ops.rmsnorm(x, norm.weight, norm.eps), x
    return ops.add_rmsnorm(x, residual, norm.weight, norm.eps)


class Linear(nn.Linear):
    """`nn.Linear` whose few-row products may go through kernels/gemv.py (see gemv_scope).

    Batch-1 decode is a chain of matrix-vector products, each streaming one weight from
    HBM, so what matters is how close to the memory bandwidth each one reads; the kernel is
    the alternative to cuBLAS there (`EngineConfig.gemv`). `forward(x, gated=True)` is the
    gated MLP's up projection with SiLU-and-mul fused, only where `takes_gemv(x)`.
    `forward(x, norm=(residual, weight, eps))` multiplies rmsnorm(x + residual) * weight
    instead of x, the residual add and norm before it inside the same launch, and returns
    (product, x + residual); only where `takes_norm(x, residual)` (residual may be RowSums).
    `forward(x, residual=r)` returns (product + r, RowSums) for the next such norm; only
    where `adds_residual(x, r)`.
    """

    def takes_gemv(self, x: torch.Tensor) -> bool:
        """Inside a gemv_scope wide enough for x's rows, for inputs the kernel takes (else
        forward falls back to F.linear)."""
        w = self.weight
        return (x.dim() == 2 and 0 < x.shape[0] <= _GEMV_ROWS.get() and x.dtype == w.dtype
                and x.device == w.device and x.stride(1) == 1 and w.stride(1) == 1)

    def takes_norm(self, x: torch.Tensor, residual=None) -> bool:
        """takes_gemv(x), for rows narrow enough for the kernel to normalize itself
        (kernels.gemv.fuses_norm: SmolLM2's width, not the 8B shape's), or with residual a
        RowSums, any rows (the sums are there)."""
        if isinstance(residual, RowSums):
            return self.takes_gemv(x)
        return self.takes_gemv(x) and _gemv_module().fuses_norm(x.shape[1])

    def adds_residual(self, x: torch.Tensor, residual) -> bool:
        """takes_gemv(x), with rows of the output too wide for the next GEMV to normalize
        alone (kernels.gemv.splits_norm: the 8B shape's) and residual a tensor shaped as it."""
        return (isinstance(residual, torch.Tensor) and self.takes_gemv(x)
                and _gemv_module().splits_norm(self.out_features, x.shape[0])
                and residual.shape == (x.shape[0], self.out_features) and residual.dtype == x.dtype
                and residual.stride(-1) == 1)

    def forward(self, x: torch.Tensor, gated: bool = False, norm=None, residual=None):
        if residual is not None:
            if gated or not self.adds_residual(x, residual):
                raise ValueError("Linear(residual=...) needs the GEMV path: check adds_residual first")
            h, sums = _gemv_module().gemv_add(x, self.weight, residual, self.bias)
            return h, RowSums(sums)
        if norm is not None:
            residual, weight, eps = norm
            if not self.takes_norm(x, residual):
                raise ValueError("Linear(norm=...) needs the GEMV path: check takes_norm(x) first")
            if isinstance(residual, RowSums):
                out = _gemv_module().gemv_rmsnorm_sums(x, residual.sums, weight, eps, self.weight,
                                                       self.bias, gated)
                return out, x
            return _gemv_module().gemv_add_rmsnorm(x, residual, weight, eps, self.weight, self.bias,
                                                   gated)
        if self.takes_gemv(x):
            return _gemv_module().gemv(x, self.weight, self.bias, gated)
        if gated:
            raise ValueError("Linear(gated=True) needs the GEMV path: check takes_gemv(x) first")
        return F.linear(x, self.weight, self.bias)


def norm_then(linear: nn.Module, x: torch.Tensor, residual, norm: RMSNorm,
              ops: LayerOps) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rmsnorm(ops, x, residual, norm)` and then `linear` on the normalized rows, in one
    GEMV launch where the linear layer takes it (Linear.takes_norm). -> (linear's output,
    x + residual)."""
    if isinstance(linear, Linear) and linear.takes_norm(x, residual):
        return linear(x, norm=(residual, norm.weight, norm.eps))
    h, residual = add_rmsnorm(ops, x, residual, norm)
    return linear(h), residual


def then_add(linear: nn.Module, x: torch.Tensor, residual) -> tuple[torch.Tensor, object]:
    """linear(x) handed on with the residual stream: (linear(x), residual), or where the GEMV
    adds the residual in for the next norm (Linear.adds_residual), (linear(x) + residual,
    RowSums)."""
    if isinstance(linear, Linear) and linear.adds_residual(x, residual):
        return linear(x, residual=residual)
    return linear(x), residual


class GatedMLP(nn.Module):
    """SiLU(x W_gate) * (x W_up) W_down with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = Linear(hidden, 2 * intermediate, bias=False)
        self.down = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, ops: LayerOps | None = None) -> torch.Tensor:
        return self.down(self._act(x, ops or TORCH_OPS))

    def _act(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        gate_up = self.gate_up
        if isinstance(gate_up, Linear) and gate_up.takes_gemv(x):  # SiLU-and-mul in the GEMV
            return gate_up(x, gated=True)
        return ops.silu_and_mul(gate_up(x))  # gate_up: [T, 2I]

    def after_norm(self, x: torch.Tensor, residual, norm: RMSNorm,
                   ops: LayerOps) -> tuple[torch.Tensor, object]:
        """forward(rmsnorm(x + residual)) handed on with the stream x + residual, the add and
        norm in the gate_up GEMV's launch where it takes them (norm_then), the next add in
        the down GEMV's where it takes that (then_add)."""
        gate_up = self.gate_up
        if isinstance(gate_up, Linear) and gate_up.takes_norm(x, residual):
            act, residual = gate_up(x, gated=True, norm=(residual, norm.weight, norm.eps))
        else:
            h, residual = add_rmsnorm(ops, x, residual, norm)
            act = self._act(h, ops)
        return then_add(self.down, act, residual)


class CPULinear(nn.Module):
    """`nn.Linear` for the CPU engine: the weight kept transposed ([in, out]), y = x @ w_t.

    torch's fp32 CPU matmul streams this layout much faster for one row (batch-1 decode is
    a chain of GEMVs): measured on the 2-core CI machine, SmolLM2's 30 layers + LM head take
    1.35-1.57x less time than through `F.linear` with [out, in] weights; prefill 1.19x less;
    batch 8-32 is within 8% either way (docs/PERF.md, CPU decode). `weight` stays readable.

    packed: the weight's GGUF blocks (`kernels.cpu.PackedWeight`, bit-exact), used for
    inputs of at most `PACKED_MAX_ROWS` rows (decode), where streaming 6-9 bits a weight
    instead of 32 wins; longer inputs (prefill) keep the dense matmul, which wins there.
    """

    PACKED_MAX_ROWS = 16  # measured: packed 1.2-4x faster up to 16 rows, 0.85x at 32

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.w_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.packed = None  # kernels.cpu.PackedWeight, set by transpose_linears

    @property
    def weight(self) -> torch.Tensor:
        return self.w_t.t()  # [out, in] view, as nn.Linear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if (packed is not None and x.numel() <= self.PACKED_MAX_ROWS * x.shape[-1]
                and x.dtype == torch.float32 and x.device.type == "cpu"):
            y = packed.matmul(x)
        else:
            y = x @ self.w_t
        return y if self.bias is None else y + self.bias


def transpose_linears(model: nn.Module, pack: bool = False) -> int:
    """Swap every `nn.Linear` in model for a `CPULinear`, in place (idempotent); -> how many.

    Each old weight is released as soon as its copy exists, so the peak is one layer over.
    A tied LM head gets its own transposed copy; the embedding keeps its rows. Afterwards
    the model's parameters are named `*.w_t` ([in, out]): load weights before, not after.
    pack: also keep each weight's GGUF blocks where they rebuild it exactly (weights loaded
    from a Q4_1 / Q8_0 GGUF) and the C kernel builds here (`kernels.cpu`).
    """
    from kernels import cpu as cpu_kernels

    pack = pack and cpu_kernels.available()
    earlier = [m for m in model.modules() if isinstance(m, CPULinear)]  # an earlier engine's
    slots = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name in slots:
        linear = getattr(parent, name)
        layer = CPULinear(linear)
        if pack:  # from the [out, in] weight while it is contiguous (its transposed view packs slower)
            layer.packed = cpu_kernels.pack(linear.weight)
        setattr(parent, name, layer)
    for layer in earlier:  # a model that an earlier engine transposed follows this one
        if pack != (layer.packed is not None):
            layer.packed = cpu_kernels.pack(layer.weight) if pack else None
    return len(slots)


class LayerOps:
    """The element-wise math of a decoder layer; this base class is the torch reference."""

    name = "torch"

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rmsnorm(x + residual), x + residual)."""
        residual = x + residual
        return self.rmsnorm(residual, weight, eps), residual

    def rotary(self, positions, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, D], k [T, Hkv, D]; cos/sin [P, D] -> rotated q, k."""
        c = cos[positions].unsqueeze(1)  # [T, 1, D]
        s = sin[positions].unsqueeze(1)
        return _rotate(q, c, s), _rotate(k, c, s)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]) * x[..., half:]


TORCH_OPS = LayerOps()


class CPUOps(LayerOps):
    """The same math through one C call per op (kernels/cpu.py) for fp32 contiguous CPU
    tensors, the torch reference for anything else. At decode sizes each torch chain costs
    tens of microseconds of dispatch on 2 cores (rotary ~140 us a layer): ~8 ms of a
    SmolLM2 step. Rotary works in place on the fused qkv output, as TritonOps'."""

    name = "cpu"

    def __init__(self) -> None:
        from kernels import cpu

        self._k = cpu
        self._positions, self._positions_ok = None, False  # one range check a step

    def rmsnorm(self, x, weight, eps):
        if self._k.fits(x, weight):
            return self._k.rmsnorm(x, weight, eps)[0]
        return super().rmsnorm(x, weight, eps)

    def add_rmsnorm(self, x, residual, weight, eps):
        if self._k.fits(x, residual, weight) and x.shape == residual.shape:
            return self._k.rmsnorm(x, weight, eps, residual)
        return super().add_rmsnorm(x, residual, weight, eps)

    def rotary(self, positions, q, k, cos, sin):
        if self._k.rotary_fits(positions, q, k, cos, sin):
            if positions is not self._positions:  # every layer gets the step's tensor
                self._positions = positions
                self._positions_ok = positions.numel() == 0 or (
                    int(positions.min()) >= 0 and int(positions.max()) < cos.shape[0])
            if self._positions_ok:
                self._k.rotary_(positions, q, k, cos, sin)
                return q, k
        return super().rotary(positions, q, k, cos, sin)

    def silu_and_mul(self, x):
        if self._k.fits(x):
            return self._k.silu_and_mul(x)
        return super().silu_and_mul(x)


class TritonOps(LayerOps):
    """The same math through the Triton kernels (fused residual add, in-place rotary)."""

    name = "triton"

    def __init__(self) -> None:
        import kernels.ops as k  # lazy: importing kernels fixes TRITON_INTERPRET for the process

        self._k = k

    def rmsnorm(self, x, weight, eps):
        return self._k.rmsnorm(x, weight, eps)

    def add_rmsnorm(self, x, residual, weight, eps):
        return self._k.fused_add_rmsnorm(x, residual, weight, eps)

    def rotary(self, positions, q, k, cos, sin):
        # q, k are views into the fused qkv output: rotating in place saves two copies
        return self._k.apply_rotary(positions, q, k, cos, sin, inplace=True)

    def silu_and_mul(self, x):
        return self._k.silu_and_mul(x)
