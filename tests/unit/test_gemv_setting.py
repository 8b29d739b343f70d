"""EngineConfig.gemv: which engines send few-row linear layers to kernels/gemv.py. The kernel
is tested in tests/kernels/test_kernel_gemv.py, the routing in a decoder in
tests/kernels/test_kernel_decoder_triton.py, and on a GPU in tests/gpu/test_gpu_engine.py."""

from __future__ import annotations

import pytest

from engine.backend import select_backend
from engine.llm import GEMV_ON_ROWS, EngineConfig, LLMEngine, resolve_gemv
from engine.loader.registry import LoadedModel, dummy_model
from tests.unit.test_run_ahead import TINY


def test_auto_follows_the_environment_else_on_for_cuda(monkeypatch):
    monkeypatch.delenv("MINIINFER_GEMV", raising=False)
    assert resolve_gemv("auto") == 0 and resolve_gemv("auto", "cpu") == 0
    assert resolve_gemv("auto", "cuda") == GEMV_ON_ROWS == 1 and resolve_gemv("off", "cuda") == 0
    assert resolve_gemv("on") == GEMV_ON_ROWS and resolve_gemv("off") == 0
    assert resolve_gemv("3") == 3 and resolve_gemv("16") == 16
    monkeypatch.setenv("MINIINFER_GEMV", "off")
    assert resolve_gemv("auto", "cuda") == 0 and resolve_gemv("4") == 4  # explicit wins
    monkeypatch.setenv("MINIINFER_GEMV", "2")
    assert resolve_gemv("auto") == 2
    monkeypatch.setenv("MINIINFER_GEMV", "lots")
    with pytest.raises(ValueError, match="MINIINFER_GEMV: gemv must be"):
        resolve_gemv("auto")


@pytest.mark.parametrize("bad", ["sometimes", "0", "17", "-1", "2.5"])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="gemv must be auto, on, off or a row count from 1 to 16"):
        EngineConfig(gemv=bad)


def test_the_setting_reaches_the_backend(monkeypatch):
    monkeypatch.delenv("MINIINFER_GEMV", raising=False)
    assert select_backend("cpu", "triton", gemv_rows=4).gemv_rows == 4
    assert select_backend("cpu", "torch", gemv_rows=4).gemv_rows == 0  # cuBLAS / CPU matmuls
    model = LoadedModel(dummy_model(TINY, seed=3), None, TINY, "tiny", 0.0)
    engine = LLMEngine(model, EngineConfig(num_pages=8, attention_backend="triton", gemv="5"))
    assert engine.backend.gemv_rows == 5
    engine = LLMEngine(model, EngineConfig(num_pages=8, attention_backend="triton"))
    assert engine.backend.gemv_rows == 0  # auto, nothing in the environment, CPU: off
