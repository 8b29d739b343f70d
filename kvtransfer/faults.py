"""Fault injection: fail, delay or kill a process at a named point of a request's path.

Off by default and free when off: call sites test the module global `PLAN` (None) before
calling in. A plan comes from the `MINIINFER_FAULTS` environment variable at import, or
at run time from `install()` (workers expose it as the `set_faults` actor method, so a
test arms one running cluster many times). Spec grammar, faults separated by `;`:

    point:action[:key=value,...]
    e.g.  decode_running:kill:worker=d0,after=3   transfer_half:delay:delay_s=2

keys: worker (worker id, "" = any), request (the client's request id, "" = any; workers know
an attempt as "<id>~<n>", and a re-prefilled one as "<id>~<n>#retryN": a fault on "<id>" hits
only the first attempt, one on "<id>#retry1" only the first retry),
after (trigger on the n-th matching hit, default 1), times (how many triggers, default 1;
0 = unlimited), delay_s (for delay). Imports neither engine, ray nor grpc.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, fields

log = logging.getLogger(__name__)

POINTS = ("prefill_running", "transfer_started", "transfer_half", "decode_running", "decode_receiving",
          "router_streaming")
ACTIONS = ("fail", "delay", "kill")
ENV = "MINIINFER_FAULTS"


class InjectedFault(RuntimeError):
    """Raised (or reported) where a `fail` fault fires."""


@dataclass
class Fault:
    point: str
    action: str
    worker: str = ""
    request: str = ""
    after: int = 1
    times: int = 1
    delay_s: float = 1.0
    hits: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def matches(self, point: str, worker: str, request: str) -> bool:
        return (point == self.point and (not self.worker or worker == self.worker)
                and (not self.request or client_id(request) == self.request))


_LEG = re.compile(r"^(.*)~\d+(#retry\d+)?$")


def client_id(leg: str) -> str:
    """The router's worker-side id of an attempt ("<id>~<n>[#retryN]") without its "~<n>"."""
    m = _LEG.match(leg)
    return leg if m is None else m.group(1) + (m.group(2) or "")


def parse(spec: str) -> list[Fault]:
    """Parse a plan; ValueError names the bad part."""
    out = []
    kinds = {f.name: f.type for f in fields(Fault)}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        bits = part.split(":", 2)
        if len(bits) < 2 or bits[0] not in POINTS or bits[1] not in ACTIONS:
            raise ValueError(f"fault {part!r}: want point:action with point in {POINTS} and action in {ACTIONS}")
        kw = {}
        for item in filter(None, (bits[2] if len(bits) > 2 else "").split(",")):
            key, _, value = item.partition("=")
            if key not in ("worker", "request", "after", "times", "delay_s"):
                raise ValueError(f"fault {part!r}: unknown key {key!r}")
            kw[key] = value if kinds[key] == "str" else (float(value) if key == "delay_s" else int(value))
        out.append(Fault(bits[0], bits[1], **kw))
    return out


class FaultPlan:
    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self._lock = threading.Lock()  # hits come from the asyncio loop and the engine thread

    def take(self, point: str, worker: str, request: str) -> Fault | None:
        """Count a hit; return the fault that fires now, if any."""
        with self._lock:
            for f in self.faults:
                if not f.matches(point, worker, request) or (f.times and f.fired >= f.times):
                    continue
                f.hits += 1
                if f.hits >= f.after:
                    f.fired += 1
                    return f
        return None


PLAN: FaultPlan | None = None


def install(spec: str) -> int:
    """Replace the plan ("" turns injection off). Returns the number of faults armed."""
    global PLAN
    faults = parse(spec)
    PLAN = FaultPlan(faults) if faults else None
    return len(faults)


def _fire(f: Fault, point: str, worker: str, request: str, can_kill: bool = True) -> None:
    log.warning("fault %s:%s fires in %s for %s", point, f.action, worker, request)
    if f.action == "kill" and can_kill:
        os._exit(17)  # no cleanup: the point is to look like a crashed process
    raise InjectedFault(f"injected fault at {point} in {worker}")


def hit(point: str, worker: str = "", request: str = "") -> None:
    """Synchronous call site (engine thread, sync generators). Call only when PLAN is set."""
    f = PLAN.take(point, worker, request) if PLAN is not None else None
    if f is None:
        return
    if f.action == "delay":
        time.sleep(f.delay_s)
        return
    _fire(f, point, worker, request)


async def ahit(point: str, worker: str = "", request: str = "", can_kill: bool = True) -> None:
    """Asyncio call site: a delay sleeps without blocking the loop."""
    f = PLAN.take(point, worker, request) if PLAN is not None else None
    if f is None:
        return
    if f.action == "delay":
        await asyncio.sleep(f.delay_s)
        return
    _fire(f, point, worker, request, can_kill)


if os.environ.get(ENV):
    install(os.environ[ENV])
