"""Model definitions. One decoder class covers Llama, Qwen2 and Qwen3 (dense); MoE
architectures swap the MLP for an expert layer."""

from engine.models.decoder import DecoderModel

__all__ = ["DecoderModel", "build_model"]


def build_model(cfg, ep=None) -> DecoderModel:
    """ep: an `engine.moe.EPContext` for MoE models spread over ranks (None: one rank)."""
    return DecoderModel(cfg, ep)
