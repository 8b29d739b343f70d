"""EngineConfig.pdl: which engines launch their Triton kernels with programmatic dependent
launch. The launch itself is tested in tests/kernels (pdl_scope, pdl_args) and on a GPU
(tests/gpu/test_gpu_engine.py)."""

from __future__ import annotations

import pytest

from engine.backend import select_backend
from engine.llm import PDL_MIN_HIDDEN, EngineConfig, LLMEngine, resolve_pdl
from engine.loader.registry import LoadedModel, dummy_model
from tests.unit.test_run_ahead import TINY


@pytest.mark.parametrize("hidden", [576, PDL_MIN_HIDDEN - 1, PDL_MIN_HIDDEN, 4096])
def test_auto_takes_pdl_for_wide_models_unless_the_environment_says(hidden, monkeypatch):
    monkeypatch.delenv("MINIINFER_PDL", raising=False)
    assert resolve_pdl("auto", hidden) is (hidden >= PDL_MIN_HIDDEN)
    assert resolve_pdl("on", hidden) is True and resolve_pdl("off", hidden) is False
    for value in ("0", "1"):  # MINIINFER_PDL set: kernels._triton.PDL_ENABLED decides
        monkeypatch.setenv("MINIINFER_PDL", value)
        assert resolve_pdl("auto", hidden) is None
        assert resolve_pdl("off", hidden) is False


def test_the_setting_reaches_the_backend_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("MINIINFER_PDL", raising=False)
    with pytest.raises(ValueError, match="pdl must be auto, on or off"):
        EngineConfig(pdl="sometimes")
    assert select_backend("cpu", "triton", pdl=True).pdl is True
    assert select_backend("cpu", "torch", pdl=True).pdl is None  # the torch backend has no PDL
    model = LoadedModel(dummy_model(TINY, seed=3), None, TINY, "tiny", 0.0)
    engine = LLMEngine(model, EngineConfig(num_pages=8, attention_backend="triton", pdl="on"))
    assert engine.backend.name == "triton" and engine.backend.pdl is True
    engine = LLMEngine(model, EngineConfig(num_pages=8, attention_backend="triton"))
    assert engine.backend.pdl is (TINY.hidden_size >= PDL_MIN_HIDDEN)
