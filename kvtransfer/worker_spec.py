"""What a worker needs to build its engine: shared by prefill and decode workers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    cuda_graphs: bool = True  # GPU: decode (decode workers) and short prefill steps from CUDA graphs
    run_ahead: str = "auto"  # EngineConfig.decode_run_ahead: auto (on CUDA) | on | off
    cluster_token: str = ""
    transfer_timeout_s: float = 30.0
    max_pairs: int = 16
    max_queue: int = 256  # most requests a worker holds (queued prompts / pending + running); over it: refused
    dummy_weights: bool = False  # the model's config + tokenizer with seeded random weights
    seed: int = 0
    kv_host: str = "127.0.0.1"  # where a decode worker's KV receiver binds; "node" = its Ray node's IP
    speculative: dict | None = None  # cluster.config.SpeculativeConfig fields (decode workers)
    # expert parallelism: this worker is rank `ep_rank` of a group of `ep_size` decode workers whose
    # rank 0 hosts the group's TCPStore at `ep_address` (host:port, picked on rank 0's node)
    ep_rank: int = 0
    ep_size: int = 1
    ep_address: object = ""  # "host:port", or a Ray ObjectRef resolving to it
    ep_timeout_s: float = 120.0  # rendezvous, and the longest a rank waits in a collective for a peer

    def kv_bind_host(self) -> str:
        if self.kv_host != "node":
            return self.kv_host
        import ray

        return ray.util.get_node_ip_address()

    def _spec_fields(self, decodes: bool) -> dict:
        """EngineConfig's speculative settings: only for workers that run decode steps."""
        s = self.speculative
        if not s or not decodes:
            return {}
        return {"spec_drafter": s["drafter"], "spec_k": s["k"], "spec_draft_model": s.get("draft_model"),
                "spec_draft_layers": s.get("draft_layers", 0)}

    def connect_ep(self):
        """Join this worker's expert-parallel group. -> engine.moe.EPContext, or None when ep_size is 1.

        Rank 0 hosts the TCPStore; every rank joins a gloo (CPU) or NCCL (GPU) group over it,
        blocking until all `ep_size` ranks have joined (bounded by ep_timeout_s). It is this
        process's default group: a worker actor is a process of its own, and the P/D pair
        groups never use the default group."""
        if self.ep_size == 1:
            return None
        if self.speculative:  # a draft pass would run collectives its peers do not
            raise ValueError("speculative decoding is not supported in an expert-parallel pool (ep_size > 1)")
        from engine.moe import EPContext

        address = self.ep_address
        if not isinstance(address, str):  # a Ray ObjectRef: picked on rank 0's node by the launcher
            import ray

            address = ray.get(address, timeout=self.ep_timeout_s)
        host, port = address.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=self.ep_timeout_s)
        store = dist.TCPStore(host, int(port), is_master=self.ep_rank == 0, wait_for_workers=False,
                              timeout=timeout)
        dist.init_process_group("nccl" if self.device == "cuda" else "gloo", store=dist.PrefixStore("ep", store),
                                rank=self.ep_rank, world_size=self.ep_size, timeout=timeout)
        return EPContext.from_group(None)

    def build_engine(self, quiet: bool = True, decode_graphs: bool = True, ep=None):
        """decode_graphs=False for prefill workers: they never run decode steps, so no capture.
        ep: the EPContext from `connect_ep` (an MoE model then keeps only this rank's experts)."""
        from engine.llm import LLMEngine

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        elif self.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        from engine.loader.registry import load_model

        loaded = load_model(self.model, DTYPES[self.dtype], self.device, quiet, self.dummy_weights, self.seed,
                            ep=ep)
        return LLMEngine(loaded, self.engine_config(loaded.config.is_moe, decode_graphs), self.device)

    def engine_config(self, is_moe: bool, decode_graphs: bool = True):
        from engine.llm import EngineConfig

        # MoE layers sync with the host every step (tokens per rank): they run eager, never graphs
        graphs = self.cuda_graphs and not is_moe
        return EngineConfig(kv_dtype=self.kv_dtype, num_pages=self.num_pages,
                            max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            cuda_graphs=graphs and decode_graphs, prefill_graphs=graphs,
                            # EP ranks make exactly one forward a step (engine.loop.Lockstep)
                            decode_run_ahead="off" if self.ep_size > 1 else self.run_ahead,
                            **self._spec_fields(decode_graphs))
