"""What a worker needs to build its engine: shared by prefill and decode workers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class WorkerSpec:
    model: str = "smollm2-135m"
    dtype: str = "fp32"
    kv_dtype: str = "auto"
    device: str = "cpu"
    num_pages: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    transport: str = "gloo"  # gloo | nccl | grpc
    torch_threads: int = 0  # 0 = all cores
    cluster_token: str = ""
    transfer_timeout_s: float = 30.0
    max_pairs: int = 16
    dummy_weights: bool = False  # the model's config + tokenizer with seeded random weights
    seed: int = 0

    def build_engine(self, quiet: bool = True, decode_graphs: bool = True):
        """decode_graphs=False for prefill workers: they never run decode steps, so no capture."""
        from engine.llm import EngineConfig, LLMEngine

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        elif self.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        config = EngineConfig(kv_dtype=self.kv_dtype, num_pages=self.num_pages,
                              max_num_seqs=self.max_num_seqs,
                              max_num_batched_tokens=self.max_num_batched_tokens,
                              cuda_graphs=decode_graphs)
        from engine.loader.registry import load_model

        loaded = load_model(self.model, DTYPES[self.dtype], self.device, quiet, self.dummy_weights, self.seed)
        return LLMEngine(loaded, config, self.device)
