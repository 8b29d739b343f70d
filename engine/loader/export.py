"""Write a model's config and tokenizer as a small HF-style directory (no weights).

    python -m engine.loader.export smollm2-135m OUT_DIR

With `dummy_weights: true` a worker then serves that shape and vocabulary with seeded
random weights: how the bundled SmolLM2 travels to a GPU machine (its 98 MB GGUF does not).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.loader.registry import load_tokenizer


def export_model_dir(name: str, out: str | Path) -> Path:
    tok, cfg = load_tokenizer(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
    }
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    if tok is not None:
        tok.tok.save(str(out / "tokenizer.json"))
        conf = {"add_bos_token": tok.add_bos}
        if tok.chat_template is not None:
            conf["chat_template"] = tok.chat_template.source
            conf["bos_token"], conf["eos_token"] = tok.chat_template.bos_token, tok.chat_template.eos_token
        (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m engine.loader.export MODEL OUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(export_model_dir(sys.argv[1], sys.argv[2]))
