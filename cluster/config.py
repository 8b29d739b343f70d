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


class PoolConfig(_Strict):
    replicas: int = Field(1, ge=0, le=64, description="number of workers in this pool")
    gpus_per_worker: int = Field(0, ge=0, le=8, description="GPUs per worker (0 on CPU)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPU resource each worker takes")
    num_pages: int = Field(2048, ge=4, description="KV pages (16 tokens each) per worker")
    max_num_seqs: int = Field(64, ge=1, description="max requests in one running batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one step")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")


class RouterSettings(_Strict):
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean otherwise")
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")


class Limits(_Strict):
    max_prompt_tokens: int = Field(7680, ge=1)
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(300.0, gt=0, description="deadline when the client sets none")
    transfer_timeout_s: float = Field(30.0, gt=0, description="KV transfer deadline")
    max_active_requests: int = Field(1024, ge=1, description="router admission bound")


class ClusterConfig(_Strict):
    model: str = Field("smollm2-135m", description="alias, .gguf file or HF directory")
    dummy_weights: bool = Field(False, description="seeded random weights of the model's shape (benchmarks)")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    kv_dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "int8"
    device: Literal["cpu", "cuda"] = "cpu"
    transport: Literal["gloo", "nccl", "grpc"] = "gloo"
    router: RouterSettings = RouterSettings()
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    limits: Limits = Limits()
    cluster_token: str = Field("", description="shared secret for the internal KV service")
    ray_address: str | None = Field(None, description="None/'local' starts Ray; 'auto' joins a running one")

    @model_validator(mode="after")
    def _check(self):
        if self.transport == "gloo" and self.device != "cpu":
            raise ValueError("transport: gloo is the CPU transport; use nccl or grpc with device cuda")
        if self.transport == "nccl" and self.device != "cuda":
            raise ValueError("transport: nccl needs device cuda; use gloo or grpc on cpu")
        for name in ("prefill", "decode"):
            pool = getattr(self, name)
            if self.device == "cuda" and pool.gpus_per_worker < 1:
                raise ValueError(f"{name}.gpus_per_worker: must be >= 1 with device cuda")
        return self


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
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    return parse_config(data, str(p))
