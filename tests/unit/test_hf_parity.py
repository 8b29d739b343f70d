"""Tiny random Llama / Qwen2 / Qwen3 checkpoints: our logits and greedy tokens vs HF's."""

import pytest
import torch

from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import load_model
from engine.sampling import SamplingParams
from tests.helpers import StepDriver, hf_greedy, rel_err

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.15,
    rms_norm_eps=1e-6,
)


def _configs():
    return {
        "llama": transformers.LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=10000.0,
                                          tie_word_embeddings=False),
        "llama-tied-mha": transformers.LlamaConfig(**COMMON, num_key_value_heads=4,
                                                   tie_word_embeddings=True),
        "qwen2": transformers.Qwen2Config(**COMMON, num_key_value_heads=1, tie_word_embeddings=False),
        "qwen3": transformers.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32,
                                          tie_word_embeddings=True),
    }


@pytest.fixture(scope="module", params=sorted(_configs()))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(1234)
    cfg = _configs()[request.param]
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_model(str(path), quiet=True)
    return request.param, hf, ours


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_arch_detected(checkpoint):
    name, _, ours = checkpoint
    assert ours.config.arch == name.split("-")[0]
    assert ours.config.qk_norm == (name == "qwen3")
    assert ours.config.attention_bias == (name == "qwen2")


def test_prefill_and_32_decode_steps_match_hf(checkpoint):
    _, hf, ours = checkpoint
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 256, (21,), generator=gen).tolist()
    driver = StepDriver(ours.model)
    req, logits = driver.start(prompt)
    ref = _hf_logits(hf, prompt)
    assert rel_err(logits, ref) < 1e-4
    seq = list(prompt)
    for _ in range(32):
        tok = int(logits[-1].argmax())
        seq.append(tok)
        logits = driver.feed(req, tok)
        ref = _hf_logits(hf, seq)[-1:]
        assert rel_err(logits, ref) < 1e-4
    driver.release(req)
    assert driver.pool.is_full()


def test_greedy_tokens_identical_to_hf_generate(checkpoint):
    _, hf, ours = checkpoint
    engine = LLMEngine(ours, EngineConfig(num_pages=64))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 33)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    hf.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 32)
    assert engine.pool.is_full()
