"""Load a llama-architecture GGUF file: config, dequantized weights, tokenizer spec.

llama.cpp's converter permutes the rows of attn_q / attn_k so that rotary pairs sit
next to each other (interleaved rotary). Our model uses the rotate-half layout, so
those rows are permuted back here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import UnsupportedModel


@dataclass
class GGUFTokenizerSpec:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None
    model: str


def _field(reader, key, default=None):
    """reader: an engine.loader.gguf_file.GGUFFile (fields hold plain Python values)."""
    return reader.fields.get(key, default)


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported (only llama)")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return ModelConfig(
        arch="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("rope.dimension_count", hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def read_tokenizer(reader) -> GGUFTokenizerSpec:
    return GGUFTokenizerSpec(
        tokens=list(_field(reader, "tokenizer.ggml.tokens")),
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type", [])],
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        model=_field(reader, "tokenizer.ggml.model", "gpt2"),
    )


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, interleaved pairs -> two halves."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise UnsupportedModel(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def iter_weights(reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor in HF orientation [out, in])."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        # GGUF lists dims innermost first; numpy data is [out, in] already.
        shape = tuple(int(d) for d in reversed(t.shape))
        arr = dequantize(t.data, t.tensor_type).reshape(shape)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # F32 tensors come back as views of the read-only mmap
            arr = arr.copy()
        w = torch.from_numpy(arr)
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, cfg.num_kv_heads)
        yield name, w
