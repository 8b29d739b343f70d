"""The router's view of the worker pools: Ray handles plus the last status each reported."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

STARTING, READY, DRAINING, DEAD = "STARTING", "READY", "DRAINING", "DEAD"
# A busy worker can be slow to answer its status (it waits for the current engine step, which
# may take seconds on a CPU); it is then pinged, which does not wait for the engine. Only this
# many unanswered pings in a row make it DEAD. A dead actor (Ray error) is DEAD at once.
MAX_MISSES = 3


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
    misses: int = 0  # status calls in a row that timed out

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
        """Ask every live worker for its status; a worker that does not answer is DEAD.

        STARTING workers are skipped: their actor may still be loading weights, and the
        controller owns them until they report ready."""
        live = [w for w in self.workers.values() if w.state not in (DEAD, STARTING)]
        results = await asyncio.gather(*(call(w.handle.status.remote(), timeout) for w in live),
                                       return_exceptions=True)
        for w, r in zip(live, results):
            if isinstance(r, asyncio.TimeoutError) and await self._busy(w, timeout):
                continue
            if isinstance(r, BaseException):
                if w.state != DEAD:
                    log.warning("worker %s stopped answering: %r", w.worker_id, r)
                w.state = DEAD
                continue
            w.status, w.last_seen, w.misses = r, time.monotonic(), 0
            if not r.get("alive", True):
                w.state = DEAD

    @staticmethod
    async def _busy(w: WorkerRef, timeout: float) -> bool:
        """After a status timeout: True if the worker still answers a ping (alive, mid-step)."""
        try:
            alive = await call(w.handle.ping.remote(), timeout)
        except asyncio.TimeoutError:
            w.misses += 1
            log.warning("worker %s answers neither status nor ping (%d in a row)", w.worker_id, w.misses)
            return w.misses < MAX_MISSES
        except Exception:  # noqa: BLE001 - the actor is gone
            return False
        if alive:
            w.misses = 0
        return bool(alive)
