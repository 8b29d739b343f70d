"""Model and engine configuration: frozen dataclasses built from HF `config.json` or GGUF."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import UnsupportedModel

DENSE_ARCHS = {"llama", "qwen2", "qwen3"}
MOE_ARCHS = {"qwen3_moe", "mixtral"}
HF_ARCH_NAMES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of one decoder-only transformer."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (num_experts == 0 means dense MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.arch not in DENSE_ARCHS | MOE_ARCHS:
            raise UnsupportedModel(f"architecture {self.arch!r} is not supported")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", "llama3"):
            raise UnsupportedModel(f"rope_scaling type {kind!r} is not supported")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Build from a HF `config.json` dict (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral)."""
        archs = d.get("architectures") or []
        arch = HF_ARCH_NAMES.get(archs[0]) if archs else d.get("model_type")
        if arch is None:
            raise UnsupportedModel(f"architecture {archs[0]!r} is not supported")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = d.get("rope_scaling") or None
        theta = d.get("rope_theta")
        params = d.get("rope_parameters") or {}
        if theta is None:
            theta = params.get("rope_theta", 10000.0)
        if rope is None and params.get("rope_type", "default") != "default":
            rope = params
        num_experts = d.get("num_experts", d.get("num_local_experts", 0)) or 0
        if arch == "qwen3_moe" and (d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1):
            raise UnsupportedModel("qwen3_moe with dense layers (mlp_only_layers, decoder_sparse_step) is not supported")
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 0),
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            num_experts=num_experts,
            num_experts_per_tok=d.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=d.get("moe_intermediate_size", d.get("intermediate_size", 0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", arch == "mixtral")),
        )
