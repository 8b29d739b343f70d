"""One import that registers every MiniInfer kernel as a `torch.ops.miniinfer.*` custom op.

Each kernel file registers its own ops on import; this module imports them all and
re-exports the public wrappers, so callers (and torch.compile / CUDA-graph code that looks
ops up by name) need one line: `import kernels.ops`.
"""

from kernels.activation import silu_and_mul
from kernels.decode_attention import (
    decode_attention,
    fuses_rotary_store,
    rotary_store_decode_attention,
)
from kernels.kv_store import rotary_store_kv, store_kv
from kernels.moe import moe_gather_sum, moe_route
from kernels.prefill_attention import cu_seqlens, prefill_attention
from kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from kernels.rotary import apply_rotary
from kernels.spec_verify import spec_verify

OP_NAMES = (
    "rmsnorm",
    "fused_add_rmsnorm",
    "rotary_embedding",
    "rotary_embedding_",
    "silu_and_mul",
    "store_kv",
    "rotary_store_kv",
    "decode_attention",
    "rotary_store_decode_attention",
    "prefill_attention",
    "spec_verify",
    "moe_route",
    "moe_gather_sum",
)

__all__ = [
    "OP_NAMES",
    "apply_rotary",
    "cu_seqlens",
    "decode_attention",
    "fused_add_rmsnorm",
    "fuses_rotary_store",
    "moe_gather_sum",
    "moe_route",
    "prefill_attention",
    "rmsnorm",
    "rotary_store_decode_attention",
    "rotary_store_kv",
    "silu_and_mul",
    "spec_verify",
    "store_kv",
]
