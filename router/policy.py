"""Pure policy functions: which decode and which prefill worker gets a request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeView:
    worker_id: str
    ready: bool
    pages_free: int
    running: int
    inflight: int = 0  # requests the router sent that the last status did not count yet


@dataclass(frozen=True)
class PrefillView:
    worker_id: str
    ready: bool
    queued: int  # requests sent to it whose first token has not come back


def choose_decode(workers: list[DecodeView], pages_needed: int) -> str | None:
    """Among ready workers with room, the one with the smallest batch, then the most free pages."""
    fits = [w for w in workers if w.ready and w.pages_free >= pages_needed]
    if not fits:
        return None
    return min(fits, key=lambda w: (w.running + w.inflight, -w.pages_free, w.worker_id)).worker_id


def choose_prefill(workers: list[PrefillView]) -> str | None:
    """Least-loaded ready prefill worker (shortest queue); ties by id for determinism."""
    ready = [w for w in workers if w.ready]
    if not ready:
        return None
    return min(ready, key=lambda w: (w.queued, w.worker_id)).worker_id
