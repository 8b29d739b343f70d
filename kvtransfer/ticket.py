"""Tickets: the decode worker's promise of pages for one prompt, and where to send them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Ticket:
    ticket_id: str
    request_id: str
    decode_id: str
    num_tokens: int  # prompt tokens whose K/V will arrive
    transport: str  # "torch" (gloo/nccl pairwise group) or "grpc"
    deadline: float  # unix time after which the decode worker drops the reservation
    grpc_address: str = ""  # decode worker's KV receiver (grpc transport)
    store_address: str = ""  # decode worker's TCPStore host:port (torch transport)
    decode_handle: Any = field(default=None, repr=False)  # Ray actor handle (torch transport)
    epoch: int = 0  # bumps when the decode worker restarts: fresh pairwise groups

    @classmethod
    def from_dict(cls, d: dict, decode_handle: Any = None) -> Ticket:
        """Rebuild from the dict a decode worker's `reserve` returned (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}, decode_handle=decode_handle)
