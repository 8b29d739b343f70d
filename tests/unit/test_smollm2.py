"""The bundled SmolLM2-135M GGUF: tokenizer, chat template and greedy output vs HF."""

import pytest

from engine.llm import EngineConfig, LLMEngine
from engine.sampling import SamplingParams
from tests.helpers import hf_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
    "Water boils at a temperature of",
    "The quick brown fox",
]
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "naïve café, Zürich — “quotes” … ½ ✓",
    "日本語のテキストと한국어 텍스트",
    "emoji 🤖🚀 and combining e\u0301",
    "def f(x):\n    return x ** 2  # square\n",
    "numbers 1234567890 3.14159 -42 1e-9",
    "<|im_start|>user\nhi<|im_end|>\n",
    "URLs: https://example.com/a?b=c&d=e",
    "",
]


@pytest.fixture(scope="module")
def engine(smollm2):
    return LLMEngine(smollm2, EngineConfig(num_pages=512))


def test_config_read_from_gguf(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (30, 9, 3, 64, 576)
    assert c.tie_word_embeddings and c.vocab_size == 49152


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_hf(smollm2, hf_smollm2, text):
    _, hf_tok = hf_smollm2
    assert smollm2.tokenizer.encode(text) == hf_tok(text, add_special_tokens=True)["input_ids"]
    ids = smollm2.tokenizer.encode(text)
    assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)


def test_chat_template_matches_hf(smollm2, hf_smollm2):
    _, hf_tok = hf_smollm2
    for messages in (
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    ):
        ours = smollm2.tokenizer.apply_chat_template(messages)
        theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == theirs


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_greedy_48_tokens_match_hf(engine, hf_smollm2, chat):
    hf_model, _ = hf_smollm2
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in PROMPTS]
    prompts = [tok.encode(t) for t in texts]
    outs = engine.generate(prompts, SamplingParams(max_tokens=48))
    for p, o in zip(prompts, outs):
        ref = hf_greedy(hf_model, p, 48)
        if ref and ref[-1] in tok.eos_token_ids:
            assert o.finish_reason == "stop"
        assert o.token_ids == ref, f"diverged for {tok.decode(p)!r}"
    assert engine.pool.is_full()


def test_batch_invariance(engine):
    """Each prompt's greedy output is the same alone as inside a mixed-length batch."""
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    together = engine.generate(prompts, params)
    for p, o in zip(prompts, together):
        alone = engine.generate([p], params)[0]
        assert alone.token_ids == o.token_ids
    assert engine.pool.is_full()


def test_chunked_prefill_matches_unchunked(smollm2):
    """A prompt longer than the step token budget is prefilled in chunks, with the same result."""
    tok = smollm2.tokenizer
    prompt = tok.encode(" ".join(PROMPTS) * 3)
    assert len(prompt) > 40
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    whole = LLMEngine(smollm2, EngineConfig(num_pages=64)).generate([prompt], params)[0]
    chunked = LLMEngine(smollm2, EngineConfig(num_pages=64, max_num_batched_tokens=19)).generate([prompt], params)[0]
    assert chunked.token_ids == whole.token_ids
