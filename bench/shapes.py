"""Model shapes for benchmarks and GPU tests, as HF `config.json` dicts.

`ModelConfig.from_hf(shape)` gives ours and `transformers.LlamaConfig(**shape)` gives HF's,
so both sides of a comparison are built from one description. Weights come from
`engine.loader.registry.dummy_model` / `random_model` (seeded, no checkpoint needed).
"""

from __future__ import annotations


def smollm2_135m() -> dict:
    """SmolLM2-135M(-Instruct): the model the CPU path ships with."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama3_8b() -> dict:
    """Llama-3-8B: 32 layers, GQA 32/8, untied 128k vocabulary."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }


SHAPES = {"smollm2-135m": smollm2_135m, "llama3-8b": llama3_8b}


def shape(name: str) -> dict:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    return SHAPES[name]()
