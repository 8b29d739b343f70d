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

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> KVPayload:
        """The inverse of `tensors()`: pages, then (int8) their scales."""
        return cls(tensors[0], tensors[1] if len(tensors) > 1 else None)

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


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The same bytes with the last dim read as the widest integer type that divides it.

    Gather/scatter kernels cost per element: moving int8 pages as int64 moves 8x fewer
    elements for the same bytes (a head_dim of 128 int8 values is 16 int64s)."""
    row = t.shape[-1] * t.element_size()
    for wide in (torch.int64, torch.int32, torch.int16):
        size = torch.empty((), dtype=wide).element_size()
        if row % size == 0 and t.element_size() <= size and t.stride(-1) == 1:
            return t.view(wide)
    return t


def export_pages(cache: KVCache, pages: list[int], num_tokens: int) -> KVPayload:
    n = pages_needed(num_tokens, cache.page_size)
    idx = torch.tensor(pages[:n], dtype=torch.int64, device=cache.data.device)
    data = _wide(cache.data).index_select(2, idx).view(cache.data.dtype)  # [L, 2, n, S, Hkv, D]
    scales = _wide(cache.scales).index_select(2, idx).view(torch.float32) if cache.quantized else None
    return KVPayload(data, scales)


def import_pages(cache: KVCache, pages: list[int], payload: KVPayload) -> None:
    n = payload.data.shape[2]
    dev = cache.data.device
    idx = torch.tensor(pages[:n], dtype=torch.int64, device=dev)
    _wide(cache.data).index_copy_(2, idx, _wide(payload.data.to(dev).contiguous()))
    if cache.quantized:
        _wide(cache.scales).index_copy_(2, idx, _wide(payload.scales.to(dev).contiguous()))


def checksum(payload: KVPayload) -> int:
    """CRC-32 of the payload bytes (computed on host memory)."""
    crc = 0
    for t in payload.tensors():
        crc = zlib.crc32(to_bytes(t), crc)
    return crc


def to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()


def host_bytes(tensors: list[torch.Tensor]) -> memoryview:
    """The tensors' bytes back to back in host memory (one copy from the device), as a view."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    joined = flat[0] if len(flat) == 1 else torch.cat(flat)
    return memoryview(joined.cpu().numpy()).cast("B")


def from_bytes(buf: bytes | bytearray | memoryview, shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over `buf`: no copy when the buffer is writable (a bytearray or a view of one)."""
    if isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly):
        buf = bytearray(buf)
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def payload_from_bytes(cache: KVCache, num_tokens: int, blob) -> KVPayload:
    """The payload laid out back to back in `blob` (pages, then int8 scales), as tensors over
    it: no copy when the buffer is writable."""
    tensors, off = [], 0
    for shape, dtype in payload_shapes(cache, num_tokens):
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        tensors.append(from_bytes(memoryview(blob)[off: off + size], shape, dtype))
        off += size
    return KVPayload.from_tensors(tensors)


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
