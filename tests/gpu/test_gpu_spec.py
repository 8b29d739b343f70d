"""Speculative decoding on the GPU engine (Triton kernels, verify + draft CUDA graphs).

Lossless: greedy tokens with speculation equal greedy tokens without it, fp32, for both
drafters, on a seeded dummy model of the SmolLM2-135M shape; the verify and draft steps
must have been replayed from their graphs and drafts accepted. Pools end full.
"""

from __future__ import annotations

import pytest
import torch

from bench.shapes import smollm2_135m
from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, dummy_model
from engine.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = ModelConfig.from_hf(smollm2_135m())


@pytest.fixture(scope="module")
def loaded():
    model = dummy_model(CFG, seed=0, dtype=torch.float32, device="cpu").to("cuda")
    return LoadedModel(model, None, CFG, "smollm2-shape", 0.0)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist() * 4 for n in (7, 12, 20)]


def _run(loaded, **spec) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(loaded, EngineConfig(num_pages=256, max_num_seqs=8, **spec), "cuda")
    out = engine.generate(_prompts(), SamplingParams(max_tokens=48, ignore_eos=True))
    return [c.token_ids for c in out], engine


@pytest.mark.parametrize(
    "spec", [dict(spec_drafter="ngram", spec_k=4), dict(spec_drafter="draft", spec_k=3, spec_draft_layers=20)]
)
def test_gpu_greedy_lossless(loaded, spec):
    expected, _ = _run(loaded)
    got, engine = _run(loaded, **spec)
    assert got == expected
    stats = engine.spec_stats()
    assert stats["spec_verify_steps"] > 0 and stats["spec_accepted_tokens"] > 0, stats
    assert engine.runner.spec.graphs.replays > 0  # verify steps ran from captured graphs
    if spec["spec_drafter"] == "draft":
        assert engine.runner.spec.drafter.runner.graphs.replays > 0
    assert engine.pool.is_full()
