"""Which code computes a step: the torch reference or the Triton kernels.

Chosen once, when an engine is built, from its device: CPU keeps the torch reference
attention (what the HF parity tests check), with its norms, rotary, activation and decode
attention in C (`CPUOps`, `CPUAttention`, kernels/cpu.c) unless told not to; CUDA takes
the Triton kernels. Nothing else in the engine asks which device it is on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, CPUAttention, TorchAttention, TritonAttention
from engine.layers import TORCH_OPS, CPUOps, LayerOps, TritonOps, gemv_scope

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    ops: LayerOps  # norms, rotary, activation
    attn: AttentionBackend  # KV store + paged attention
    nvtx: bool = False  # emit NVTX ranges (CUDA only; no-ops elsewhere)
    # Triton kernels with programmatic dependent launch (Hopper+): True / False, or None to
    # leave it to MINIINFER_PDL (kernels._triton.PDL_ENABLED). See engine.llm.EngineConfig.pdl
    pdl: bool | None = None
    # Linear layers multiply inputs of at most this many rows with kernels/gemv.py (0: cuBLAS
    # always); engine.llm.EngineConfig.gemv chooses it
    gemv_rows: int = 0

    def range(self, label: str):
        """An NVTX range for Nsight / the torch profiler; a null context off CUDA."""
        return torch.cuda.nvtx.range(label) if self.nvtx else contextlib.nullcontext()

    @contextlib.contextmanager
    def launches(self):
        """Around a forward pass: the kernels it launches (or a CUDA graph captures) take
        this backend's launch options (PDL, the GEMV kernel for few rows). Nothing on the
        torch backend."""
        if self.name != "triton":
            yield
            return
        from kernels._triton import pdl_scope  # lazy: triton is imported with kernels only

        with pdl_scope(self.pdl), gemv_scope(self.gemv_rows):
            yield


TORCH_BACKEND = Backend("torch", TORCH_OPS, TorchAttention())


def select_backend(device: torch.device | str, name: str = "auto", cpu_kernels: bool = False,
                   pdl: bool | None = None, gemv_rows: int = 0) -> Backend:
    """auto = triton on CUDA, torch elsewhere. triton on CPU needs TRITON_INTERPRET=1.
    cpu_kernels: on CPU, the torch backend's norms, rotary and activation
    (`engine.layers.CPUOps`) and decode attention (`CPUAttention`) go through the C kernels
    when they build here. pdl, gemv_rows: the triton backend's `Backend.pdl`, `.gemv_rows`."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        if cpu_kernels and device.type == "cpu":
            from kernels import cpu

            if cpu.available():
                return Backend("torch", CPUOps(), CPUAttention())
        return Backend("torch", TORCH_OPS, TorchAttention(), nvtx=device.type == "cuda")
    return Backend("triton", TritonOps(), TritonAttention(), nvtx=device.type == "cuda", pdl=pdl,
                   gemv_rows=gemv_rows)
