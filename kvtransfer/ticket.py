"""Tickets: the decode worker's promise of pages for one prompt, and where to send them."""

from __future__ import annotations

import time
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


class RecentLegs:
    """A bounded memory of leg ids and when each was noted: at most `limit`, each `ttl_s`.

    Two uses, both about aborts racing the calls they abort:
    - a worker notes a leg it was told to abort before it had heard of it. The router may
      give up on a call (its deadline, its own timeout) while the call is still queued on
      the worker and abort it at once, so the abort can run first; the late call (reserve,
      submit, prefill) then `take`s the note and is refused instead of running for nobody.
      The router never reuses a leg id (`<id>~<n>`), so a note cannot refuse a later request;
    - the router notes every leg it aborts, so that outputs already on their way are not
      taken for an orphan's (`seen` within a second).
    """

    def __init__(self, ttl_s: float = 120.0, limit: int = 4096, clock=time.monotonic) -> None:
        self.ttl_s, self.limit, self.clock = ttl_s, limit, clock
        self._seen: dict[str, float] = {}  # in the order noted: the first is the oldest

    def note(self, leg: str) -> None:
        now = self.clock()
        self._seen.pop(leg, None)
        if len(self._seen) >= self.limit:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.ttl_s}
            while len(self._seen) >= self.limit:  # all fresh: drop the oldest
                self._seen.pop(next(iter(self._seen)))
        self._seen[leg] = now

    def seen(self, leg: str) -> bool:
        """Whether leg was noted less than ttl_s ago."""
        t = self._seen.get(leg)
        return t is not None and self.clock() - t < self.ttl_s

    def take(self, leg: str) -> bool:
        """`seen`, and forget it."""
        t = self._seen.pop(leg, None)
        return t is not None and self.clock() - t < self.ttl_s

    def __len__(self) -> int:
        return len(self._seen)
