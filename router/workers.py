"""The router's view of the worker pools: Ray handles plus the last status each reported."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

STARTING, READY, DRAINING, DEAD = "STARTING", "READY", "DRAINING", "DEAD"


@dataclass
class WorkerRef:
    worker_id: str
    role: str  # "prefill" | "decode"
    handle: object  # Ray actor handle
    state: str = STARTING
    info: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    inflight: int = 0  # router-side count of requests sent and not yet answered/finished
    last_seen: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state == READY


async def call(ref, timeout: float):
    """Await a Ray ObjectRef with a timeout (every wait has one)."""
    return await asyncio.wait_for(_awaitable(ref), timeout)


async def _awaitable(ref):
    return await ref


class WorkerTable:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerRef] = {}

    def add(self, w: WorkerRef) -> None:
        self.workers[w.worker_id] = w

    def remove(self, worker_id: str) -> WorkerRef | None:
        return self.workers.pop(worker_id, None)

    def pool(self, role: str) -> list[WorkerRef]:
        return [w for w in self.workers.values() if w.role == role]

    def get(self, worker_id: str) -> WorkerRef | None:
        return self.workers.get(worker_id)

    async def refresh(self, timeout: float = 5.0) -> None:
        """Ask every live worker for its status; a worker that does not answer is DEAD."""
        live = [w for w in self.workers.values() if w.state != DEAD]
        results = await asyncio.gather(*(call(w.handle.status.remote(), timeout) for w in live),
                                       return_exceptions=True)
        for w, r in zip(live, results):
            if isinstance(r, BaseException):
                if w.state != DEAD:
                    log.warning("worker %s stopped answering: %s", w.worker_id, r)
                w.state = DEAD
                continue
            w.status, w.last_seen = r, time.monotonic()
            if not r.get("alive", True):
                w.state = DEAD
