"""Exported config + tokenizer dir (no weights) and seeded dummy weights."""

import torch

from engine.llm import EngineConfig, LLMEngine
from engine.loader.export import export_model_dir
from engine.loader.registry import load_model
from engine.sampling import SamplingParams

TEXTS = ["Hello world", "naïve café 日本語 🤖", "def f(x):\n    return x ** 2\n", "<|im_start|>user\nhi"]


def test_export_keeps_tokenizer_template_and_shape(smollm2, tmp_path):
    d = export_model_dir("smollm2-135m", tmp_path / "m")
    dummy = load_model(str(d), dummy_weights=True, quiet=True)
    assert dummy.config.num_layers == smollm2.config.num_layers
    assert dummy.config.eos_token_ids == smollm2.config.eos_token_ids
    for t in TEXTS:
        assert dummy.tokenizer.encode(t) == smollm2.tokenizer.encode(t)
    msgs = [{"role": "user", "content": "Hi"}]
    assert dummy.tokenizer.apply_chat_template(msgs) == smollm2.tokenizer.apply_chat_template(msgs)
    assert set(dummy.tokenizer.eos_token_ids) >= set(smollm2.tokenizer.eos_token_ids)


def test_dummy_weights_seeded_nonzero_and_runnable(tmp_path):
    d = export_model_dir("smollm2-135m", tmp_path / "m")
    a = load_model(str(d), dummy_weights=True, seed=3, quiet=True)
    b = load_model(str(d), dummy_weights=True, seed=3, quiet=True)
    c = load_model(str(d), dummy_weights=True, seed=4, quiet=True)
    wa, wb, wc = (m.model.layers[0].attn.qkv.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert all(p.abs().sum() > 0 for p in a.model.parameters())
    out = LLMEngine(a, EngineConfig(num_pages=32)).generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
