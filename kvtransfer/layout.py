"""The KV transfer contract: a header the receiver validates before committing, and a payload.

Payload = the prompt's pages copied out of the sender's cache:
  data   [num_layers, 2, n_pages, page_size, num_kv_heads, head_dim]  (cache dtype)
  scales [num_layers, 2, n_pages, page_size, num_kv_heads] float32     (int8 only)
Pages are copied on export, so the sender frees its own pages at once and the
transfer never holds the prefill worker's pool.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import torch

from engine.kv_cache import KVCache
from engine.page_pool import pages_needed

LAYOUT_VERSION = 1
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class KVTransferError(RuntimeError):
    """A transfer failed or was rejected; pages on the receiving side are released."""


@dataclass(frozen=True)
class KVHeader:
    request_id: str
    ticket_id: str
    num_tokens: int
    num_layers: int
    dtype: str
    page_size: int
    num_kv_heads: int
    head_dim: int
    num_bytes: int
    checksum: int
    first_token: int
    layout_version: int = LAYOUT_VERSION
    first_logprob: float = 0.0
    sender_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KVHeader:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class KVPayload:
    data: torch.Tensor
    scales: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.scales is None else [self.data, self.scales]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def payload_shapes(cache: KVCache, num_tokens: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    s = cache.spec
    n = pages_needed(num_tokens, s.page_size)
    shapes = [((s.num_layers, 2, n, s.page_size, s.num_kv_heads, s.head_dim), s.dtype)]
    if cache.quantized:
        shapes.append(((s.num_layers, 2, n, s.page_size, s.num_kv_heads), torch.float32))
    return shapes


def export_pages(cache: KVCache, pages: list[int], num_tokens: int) -> KVPayload:
    n = pages_needed(num_tokens, cache.page_size)
    idx = torch.tensor(pages[:n], dtype=torch.int64, device=cache.data.device)
    data = cache.data.index_select(2, idx)  # [L, 2, n, S, Hkv, D]
    scales = cache.scales.index_select(2, idx) if cache.quantized else None
    return KVPayload(data, scales)


def import_pages(cache: KVCache, pages: list[int], payload: KVPayload) -> None:
    n = payload.data.shape[2]
    idx = torch.tensor(pages[:n], dtype=torch.int64, device=cache.data.device)
    cache.data.index_copy_(2, idx, payload.data.to(cache.data.device))
    if cache.quantized:
        cache.scales.index_copy_(2, idx, payload.scales.to(cache.data.device))


def checksum(payload: KVPayload) -> int:
    """CRC-32 of the payload bytes (computed on host memory)."""
    crc = 0
    for t in payload.tensors():
        crc = zlib.crc32(to_bytes(t), crc)
    return crc


def to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()


def from_bytes(buf: bytes | bytearray | memoryview, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape)


def make_header(cache: KVCache, payload: KVPayload, request_id: str, ticket_id: str, num_tokens: int,
                first_token: int, first_logprob: float = 0.0, sender_id: str = "",
                with_checksum: bool = True) -> KVHeader:
    s = cache.spec
    return KVHeader(
        request_id=request_id,
        ticket_id=ticket_id,
        num_tokens=num_tokens,
        num_layers=s.num_layers,
        dtype=DTYPE_NAMES[s.dtype],
        page_size=s.page_size,
        num_kv_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        num_bytes=payload.num_bytes,
        checksum=checksum(payload) if with_checksum else 0,
        first_token=first_token,
        first_logprob=first_logprob,
        sender_id=sender_id,
    )


def validate_header(h: KVHeader, cache: KVCache, expected_tokens: int | None = None) -> None:
    """Raise KVTransferError unless the header describes exactly what this cache can take."""
    s = cache.spec
    problems = []
    if h.layout_version != LAYOUT_VERSION:
        problems.append(f"layout version {h.layout_version} != {LAYOUT_VERSION}")
    if NAME_DTYPES.get(h.dtype) != s.dtype:
        problems.append(f"dtype {h.dtype} != {DTYPE_NAMES[s.dtype]}")
    for field, want in (("num_layers", s.num_layers), ("page_size", s.page_size),
                        ("num_kv_heads", s.num_kv_heads), ("head_dim", s.head_dim)):
        if getattr(h, field) != want:
            problems.append(f"{field} {getattr(h, field)} != {want}")
    if expected_tokens is not None and h.num_tokens != expected_tokens:
        problems.append(f"num_tokens {h.num_tokens} != reserved {expected_tokens}")
    if not problems:
        want_bytes = sum(
            torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            for shape, dt in payload_shapes(cache, h.num_tokens)
        )
        if h.num_bytes != want_bytes:
            problems.append(f"num_bytes {h.num_bytes} != {want_bytes}")
    if problems:
        raise KVTransferError(f"KV header rejected for {h.request_id}: " + "; ".join(problems))
