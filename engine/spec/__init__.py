"""Speculative decoding: drafters propose k tokens, the target verifies them in one step.

`drafters.py` holds the interface and the n-gram (prompt-lookup) drafter, `draft_model.py`
the small-model drafter, `decoder.py` the verify step, acceptance and metrics.
"""

from engine.spec.decoder import SpecDecoder, SpecMetrics, build_spec_decoder
from engine.spec.draft_model import DraftModelDrafter, truncated_model
from engine.spec.drafters import DRAFTERS, Drafter, NgramDrafter, Proposal

__all__ = [
    "DRAFTERS",
    "DraftModelDrafter",
    "Drafter",
    "NgramDrafter",
    "Proposal",
    "SpecDecoder",
    "SpecMetrics",
    "build_spec_decoder",
    "truncated_model",
]
