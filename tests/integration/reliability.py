"""Helpers shared by the fault, fuzz and load tests: arm faults, check that nothing is left behind."""

from __future__ import annotations

import time

from cluster.client import build_request
from kvtransfer import faults
from router.workers import DEAD, READY, call


def stream_ids(stub, prompt: str, max_tokens: int, timeout: float = 60.0, request_id: str = "") -> list[int]:
    req = build_request(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, request_id=request_id)
    return [t for msg in stub.Generate(req, timeout=timeout) for t in msg.token_ids]


def arm(c, spec: str) -> None:
    """Install one fault plan in every live worker and in the router (this process); "" disarms."""
    faults.install(spec)
    for w in list(c.cluster.table.workers.values()):
        if w.state != DEAD:
            # a replacement may still be loading its model (an actor answers after its
            # constructor): on a loaded 2-core machine that takes well over 10 s
            c.run(call(w.handle.set_faults.remote(spec), 90), timeout=100)


def worker_tables(c) -> dict[str, dict]:
    """Each live worker's raw status (pages, batch, pending tickets, queued prompts)."""
    live = [w for w in c.cluster.table.workers.values() if w.state != DEAD]
    return {w.worker_id: c.run(call(w.handle.status.remote(), 10)) for w in live}


LEFTOVER_KEYS = ("running", "waiting", "pending_transfers", "by_request", "waiters", "transfers_in_flight")


def assert_settled(c, timeout: float = 30.0) -> None:
    """Every page pool full and no request in any table (router or worker), within timeout."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.cluster.router
        tables = worker_tables(c)
        left = {wid: {k: s[k] for k in LEFTOVER_KEYS if s.get(k)} for wid, s in tables.items()}
        left = {wid: v for wid, v in left.items() if v}
        short = {wid: (s["pages_free"], s["pages_total"]) for wid, s in tables.items()
                 if s["pages_free"] != s["pages_total"]}
        if not (r.active or r.legs or left or short):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout}s: router active={list(r.active)} "
                                 f"legs={list(r.legs)}; worker tables {left}; pages (free, total) {short}")
        time.sleep(0.2)


def replacement(c, role: str, before: set[str]) -> str:
    """Wait until the controller replaced the killed worker of `role` (a fresh id, READY)."""
    deadline = time.monotonic() + 150
    while True:
        pool = c.cluster.table.pool(role)
        new = [w.worker_id for w in pool if w.worker_id not in before and w.state == READY]
        if new and all(w.state == READY for w in pool):
            return new[0]
        assert time.monotonic() < deadline, f"{role} pool not restored: {[(w.worker_id, w.state) for w in pool]}"
        time.sleep(0.2)
