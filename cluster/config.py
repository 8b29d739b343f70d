"""Cluster configuration: one YAML file validated by pydantic. Errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """The config file is unreadable or a field is invalid; the message names it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscaleConfig(_Strict):
    """Optional per pool: the controller sizes the pool between the bounds (cluster/autoscale.py)."""

    min_replicas: int = Field(1, ge=1, le=64, description="never fewer workers than this")
    max_replicas: int = Field(1, ge=1, le=64, description="never more workers than this")
    metric: Literal["queue_depth", "kv_usage", "ttft_p90"] = Field(
        "queue_depth", description="queued requests per worker, KV fraction used, or TTFT p90 (s)")
    target: float = Field(4.0, gt=0, description="the metric's per-worker value to aim for")
    tolerance: float = Field(0.1, ge=0, lt=1, description="no change while within this fraction of target")
    up_cooldown_s: float = Field(5.0, ge=0, description="least time between a change and a scale-up")
    down_cooldown_s: float = Field(30.0, ge=0, description="least time between a change and a scale-down")
    down_window_s: float = Field(30.0, gt=0, description="scale down only if the whole window agrees")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.metric == "kv_usage" and self.target > 1:
            raise ValueError("target: kv_usage is a fraction of pages, in (0, 1]")
        return self


class SpeculativeConfig(_Strict):
    """Speculative decoding on a decode pool (engine/spec/): draft k tokens, verify in one step."""

    drafter: Literal["ngram", "draft"] = Field("ngram", description="prompt lookup, or a small draft model")
    k: int = Field(4, ge=1, le=16, description="tokens drafted and verified per step")
    draft_model: str | None = Field(None, description="draft checkpoint (same tokenizer); None = the "
                                                      "target's first draft_layers layers")
    draft_layers: int = Field(0, ge=0, description="truncated-target draft depth; 0 = a quarter")


class PoolConfig(_Strict):
    replicas: int = Field(1, ge=0, le=64, description="number of workers in this pool")
    gpus_per_worker: int = Field(0, ge=0, le=8, description="GPUs per worker (0 on CPU)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPU resource each worker takes")
    num_pages: int = Field(2048, ge=4, description="KV pages (16 tokens each) per worker")
    max_num_seqs: int = Field(64, ge=1, description="max requests in one running batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one step")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    cuda_graphs: bool = Field(True, description="GPU workers: replay decode steps and short prefill steps "
                                                "from CUDA graphs; false runs every step eagerly")
    run_ahead: Literal["auto", "on", "off"] = Field(
        "auto", description="decode pool: launch each decode step before the step before it is read, fed "
                           "its tokens on the GPU (host work overlaps the GPU's); auto = on CUDA")
    autoscale: AutoscaleConfig | None = Field(None, description="size the pool from its load (optional)")
    ep_size: int = Field(1, ge=1, le=64, description="ranks per expert-parallel group (MoE models, decode "
                                                     "pool); replicas counts ranks, a multiple of ep_size")
    speculative: SpeculativeConfig | None = Field(None, description="decode pool only: speculative decoding")

    @property
    def max_workers(self) -> int:
        return max(self.replicas, self.autoscale.max_replicas if self.autoscale else 0)


class RouterSettings(_Strict):
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean otherwise")
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    api_token: str = Field("", description="if set, every MiniInfer call needs `authorization: Bearer <token>`")
    tls_cert: str | None = Field(None, description="PEM certificate file: serve TLS (with tls_key)")
    tls_key: str | None = Field(None, description="PEM private key file of tls_cert")

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: set both or neither")
        return self


class MetricsSettings(_Strict):
    host: str = Field("127.0.0.1", description="bind address of the Prometheus endpoint")
    port: int | None = Field(None, ge=0, le=65535, description="None = no endpoint; 0 picks a free port")


class ControllerSettings(_Strict):
    tick_s: float = Field(0.5, gt=0, le=60, description="how often pools are reconciled and sampled")
    drain_timeout_s: float = Field(300.0, gt=0, description="a draining worker is stopped after this")
    start_timeout_s: float = Field(600.0, gt=0, description="a new worker must be ready within this")


class Limits(_Strict):
    max_prompt_tokens: int = Field(7680, ge=1)
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(300.0, gt=0, description="deadline when the client sets none")
    transfer_timeout_s: float = Field(30.0, gt=0, description="KV transfer deadline")
    max_active_requests: int = Field(1024, ge=1, description="router admission bound")
    max_worker_requests: int = Field(256, ge=1, description="requests one worker holds; more: RESOURCE_EXHAUSTED")
    max_retries: int = Field(2, ge=0, le=8, description="re-prefills after a worker dies or fails a request")
    max_message_bytes: int = Field(4 << 20, ge=1024, le=64 << 20, description="largest request message")
    max_stop_strings: int = Field(16, ge=0, le=16, description="stop strings per request")
    max_stop_string_chars: int = Field(256, ge=1, le=256, description="characters per stop string")


class ClusterConfig(_Strict):
    model: str = Field("smollm2-135m", description="alias, .gguf file or HF directory")
    dummy_weights: bool = Field(False, description="seeded random weights of the model's shape (benchmarks)")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    kv_dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "int8"
    device: Literal["cpu", "cuda"] = "cpu"
    transport: Literal["gloo", "nccl", "grpc"] = "gloo"
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="colocated: decode workers prefill their own prompts (baseline); "
                                     "the prefill pool must then have 0 replicas")
    router: RouterSettings = RouterSettings()
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    limits: Limits = Limits()
    metrics: MetricsSettings = MetricsSettings()
    controller: ControllerSettings = ControllerSettings()
    cluster_token: str = Field("", description="shared secret for the internal KV service")
    kv_host: str = Field("127.0.0.1", description="where decode workers' KV receivers bind; "
                                                  "'node' = each worker's Ray node IP (multi-node)")
    ray_address: str | None = Field(None, description="None/'local' starts Ray; 'auto' joins a running one")

    @model_validator(mode="after")
    def _check(self):
        if self.transport == "gloo" and self.device != "cpu":
            raise ValueError("transport: gloo is the CPU transport; use nccl or grpc with device cuda")
        if self.transport == "nccl" and self.device != "cuda":
            raise ValueError("transport: nccl needs device cuda; use gloo or grpc on cpu")
        if self.prefill.speculative is not None:
            raise ValueError("prefill.speculative: speculative decoding runs on decode workers only")
        if self.mode == "colocated" and self.prefill.replicas:
            raise ValueError("prefill.replicas: must be 0 in colocated mode (decode workers prefill)")
        for name in ("prefill", "decode"):
            pool = getattr(self, name)
            if self.device == "cuda" and pool.replicas and pool.gpus_per_worker < 1:
                raise ValueError(f"{name}.gpus_per_worker: must be >= 1 with device cuda")
            _check_ep(name, pool)
        return self


def _check_ep(name: str, pool: PoolConfig) -> None:
    """Expert parallelism: `replicas` counts ranks; every `ep_size` of them form one group."""
    if pool.ep_size == 1:
        return
    if name == "prefill":
        raise ValueError("prefill.ep_size: prefill workers hold every expert; only the decode pool "
                         "can be expert-parallel")
    if pool.replicas % pool.ep_size:
        raise ValueError(f"{name}.replicas: {pool.replicas} is not a multiple of {name}.ep_size "
                         f"({pool.ep_size}); replicas counts ranks, ep_size ranks make one group")
    if pool.autoscale is not None:
        raise ValueError(f"{name}.autoscale: not supported with ep_size > 1 (size EP groups by hand)")
    if pool.speculative is not None:  # a draft pass would run MoE collectives its peers do not
        raise ValueError(f"{name}.speculative: not supported with ep_size > 1")


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_config(data: dict, source: str = "config") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, source: str = "config") -> ClusterConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    return parse_config(data, source)
