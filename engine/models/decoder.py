"""Decoder-only transformer over the paged KV cache (Llama / Qwen2 / Qwen3 layouts).

Tokens of every sequence in a step are packed into one flat batch `[T]`; attention
metadata says where each sequence starts and how much context it has.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.backend import TORCH_BACKEND, Backend
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    add_rmsnorm,
    norm_then,
    then_add,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def attend(self, qkv, positions, rope: RotaryEmbedding, meta: AttentionMetadata, cache: KVCache,
               backend: Backend = TORCH_BACKEND, residual=None):
        """From the qkv projection [T, q + 2 kv] on: rotary, KV store, attention, o. With the
        residual stream given, -> (o's output, residual) as engine.layers.then_add hands
        them on (maybe the two added, with RowSums)."""
        c, ops = self.cfg, backend.ops
        t = qkv.shape[0]
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(t, c.num_heads, c.head_dim)  # [T, H, D]
        k = k.view(t, c.num_kv_heads, c.head_dim)  # [T, Hkv, D]
        v = v.view(t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q, ops), self.k_norm(k, ops)
        attn = backend.attn
        kw = {"ahead": self.o.weight} if attn.prefetches_ahead else {}  # o reads it next
        if attn.fuses_rotary:  # one kernel rotates q, k and stores K/V (k stays unrotated)
            rotary = (positions, rope.cos, rope.sin)
            out = attn.forward(q, k, v, cache, self.layer, meta, rotary=rotary, **kw)  # [T, H, D]
        else:
            q, k = rope(positions, q, k, ops)
            out = attn.forward(q, k, v, cache, self.layer, meta, **kw)  # [T, H, D]
        out = out.reshape(t, c.q_size)
        return self.o(out) if residual is None else then_add(self.o, out, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ep=None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe:
            from engine.moe import MoEBlock

            self.mlp = MoEBlock(cfg, ep)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, residual, positions, rope, meta, cache, backend: Backend = TORCH_BACKEND):
        """x: the previous layer's output, residual: the stream before it (None at layer 0).

        -> (this layer's MLP output, the stream before it). Deferring each residual add
        into the next norm lets the GPU fuse them; the values are the same as
        `x = x + attn(norm(x)); x = x + mlp(norm(x))`. For few rows of a narrow model the
        add and norm also go into the next GEMV's launch (engine.layers.norm_then); for few
        rows of a wide one the add goes into the GEMV before (o, down) and the norm into the
        GEMV after, residual then being an engine.layers.RowSums (then_add).
        """
        ops = backend.ops
        if residual is None:
            residual = x
            qkv = self.attn.qkv(self.attn_norm(x, ops))
        else:
            qkv, residual = norm_then(self.attn.qkv, x, residual, self.attn_norm, ops)
        h, residual = self.attn.attend(qkv, positions, rope, meta, cache, backend, residual)
        if isinstance(self.mlp, GatedMLP):
            return self.mlp.after_norm(h, residual, self.mlp_norm, ops)
        h, residual = add_rmsnorm(ops, h, residual, self.mlp_norm)
        return self.mlp(h, ops), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ep=None) -> None:
        """ep: an `engine.moe.EPContext` spreading MoE experts over ranks (None: one rank)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ep) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids, positions, meta: AttentionMetadata, cache: KVCache,
                backend: Backend = TORCH_BACKEND):
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        with backend.launches():
            x, residual = self.embed(input_ids), None  # [T, hidden]
            for i, layer in enumerate(self.layers):
                with backend.range(f"layer {i}"):
                    x, residual = layer(x, residual, positions, self.rope, meta, cache, backend)
            return add_rmsnorm(backend.ops, x, residual, self.norm)[0]

    def compute_logits(self, hidden: torch.Tensor, backend: Backend = TORCH_BACKEND) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        with backend.launches():
            return self.lm_head(hidden).float()

    def idle_step(self) -> None:
        """An expert-parallel rank with no requests: run only every MoE layer's collectives."""
        for layer in self.layers if self.cfg.is_moe else ():
            layer.mlp.idle()

    def expert_load(self, reset: bool = False) -> list[list[int]]:
        """Per MoE layer: tokens this rank routed to each expert since the last reset ([] if dense)."""
        if not self.cfg.is_moe:
            return []
        load = [layer.mlp.expert_load()["routed"] for layer in self.layers]
        if reset:
            for layer in self.layers:
                layer.mlp.reset_load()
        return load

    # ---- weight loading: HF parameter names -> our fused parameters ----

    _SHARDS = {  # HF suffix -> (our suffix, shard index)
        "self_attn.q_proj": ("attn.qkv", 0),
        "self_attn.k_proj": ("attn.qkv", 1),
        "self_attn.v_proj": ("attn.qkv", 2),
        "mlp.gate_proj": ("mlp.gate_up", 0),
        "mlp.up_proj": ("mlp.gate_up", 1),
    }
    _RENAMES = {
        "self_attn.o_proj": "attn.o",
        "self_attn.q_norm": "attn.q_norm",
        "self_attn.k_norm": "attn.k_norm",
        "mlp.down_proj": "mlp.down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "mlp_norm",
    }

    def _shard_offsets(self, target: str, index: int) -> tuple[int, int]:
        c = self.cfg
        if target == "attn.qkv":
            sizes = [c.q_size, c.kv_size, c.kv_size]
        else:
            sizes = [c.intermediate_size, c.intermediate_size]
        return sum(sizes[:index]), sizes[index]

    def load_hf_weight(self, name: str, tensor: torch.Tensor, params: dict | None = None) -> None:
        """Copy one HF-named tensor into the matching (maybe fused) parameter."""
        params = params if params is not None else dict(self.named_parameters())
        if name == "model.embed_tokens.weight":
            return self._copy(params["embed.weight"], tensor, name)
        if name == "model.norm.weight":
            return self._copy(params["norm.weight"], tensor, name)
        if name == "lm_head.weight":
            if self.cfg.tie_word_embeddings:
                return None
            return self._copy(params["lm_head.weight"], tensor, name)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None and self.cfg.is_moe:  # transformers 5 stacks experts: `mlp.experts.down_proj`
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+\.experts\.(?:gate_up_proj|down_proj))()", name)
        if m is None:
            raise KeyError(f"unexpected weight {name!r}")
        layer, mod, kind = m.groups()
        prefix = f"layers.{layer}."
        if mod in self._SHARDS:
            target, idx = self._SHARDS[mod]
            off, size = self._shard_offsets(target, idx)
            param = params[f"{prefix}{target}.{kind}"]
            return self._copy(param.narrow(0, off, size), tensor, name)
        if mod in self._RENAMES:
            return self._copy(params[f"{prefix}{self._RENAMES[mod]}.{kind}"], tensor, name)
        if self.cfg.is_moe:
            target = self.layers[int(layer)].mlp.hf_target(mod, kind, tensor)
            return None if target is None else self._copy(*target, name)
        raise KeyError(f"unexpected weight {name!r}")

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"weight {name}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
        with torch.no_grad():
            dst.copy_(src)
