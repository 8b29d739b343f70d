"""Load a local HF checkpoint directory: config.json + *.safetensors (memory-mapped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ModelNotFound


def read_config(path: Path) -> ModelConfig:
    conf = path / "config.json"
    if not conf.is_file():
        raise ModelNotFound(f"{path}: no config.json (expected a HF checkpoint directory)")
    try:
        return ModelConfig.from_hf(json.loads(conf.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelNotFound(f"{conf}: unreadable config ({e})") from e


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every safetensors shard; tensors are mmap-backed views."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"{path}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)
