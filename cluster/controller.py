"""The controller: keeps each pool at its desired size while the cluster serves.

Every tick it samples autoscaled pools, replaces dead workers, and reconciles:
- too few workers: spawn new ones; each is started (weights, warm-up, graphs) while
  STARTING, which the router never routes to, and only then marked READY;
- too many: the least loaded become DRAINING (no new requests), finish what they
  hold (router in-flight count zero, worker idle, KV pushes done), then stop and exit.
`apply` swaps in a changed config: pool sizes and autoscaling change live; anything
that would need a different model or KV layout is refused with the fields named.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from cluster import autoscale
from cluster.config import ClusterConfig, ConfigError, parse_yaml
from cluster.metrics import pool_queue
from router.workers import DEAD, DRAINING, READY, STARTING, WorkerRef, call

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
# Config fields that change live; everything else needs a restart. ray_address is a launch
# option (`up --address`), so it is not compared.
LIVE = ("prefill.replicas", "decode.replicas", "prefill.autoscale", "decode.autoscale", "controller")
IGNORED = ("ray_address",)


class LiveChangeRefused(ValueError):
    """The new config changes fields that cannot change while the cluster serves."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def plan(old: ClusterConfig, new: ClusterConfig) -> list[str]:
    """The changes from `old` to `new` as "field: a -> b" lines. Raises LiveChangeRefused."""
    a, b = _flatten(old.model_dump()), _flatten(new.model_dump())
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not _under(k, IGNORED)]
    refused = [k for k in changed if not _under(k, LIVE)]
    if refused:
        what = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in refused)
        raise LiveChangeRefused(f"cannot change {what} on a running cluster; only pool replicas, "
                                f"autoscale and controller settings apply live. Restart with "
                                f"`miniinfer down` and `miniinfer up -c FILE` for the rest")
    for role in ROLES:  # an expert-parallel pool's groups are fixed while it serves
        o, n = getattr(old, role), getattr(new, role)
        if o.ep_size > 1 and o.replicas != n.replicas:
            raise LiveChangeRefused(f"cannot change {role}.replicas ({o.replicas} -> {n.replicas}) of an "
                                    f"expert-parallel pool (ep_size {o.ep_size}) on a running cluster; "
                                    f"restart with `miniinfer down` and `miniinfer up -c FILE`")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed]


def _order(w: WorkerRef) -> tuple:
    """Scale-down order: starting workers first, then the least loaded, then the newest."""
    num = int(w.worker_id[1:]) if w.worker_id[1:].isdigit() else 0
    return (w.state != STARTING, w.inflight + w.status.get("running", 0), -num)


def _idle(status: dict) -> bool:
    keys = ("running", "waiting", "pending_transfers", "transfers_in_flight")
    return all(status.get(k, 0) == 0 for k in keys)


class Controller:
    def __init__(self, cluster) -> None:
        self.cluster = cluster  # cluster.launch.Cluster: spawn(), table, router, metrics
        self.config: ClusterConfig = cluster.config
        self.table = cluster.table
        self.desired = {r: self._bounded(r, getattr(self.config, r).replicas) for r in ROLES}
        self.events: deque[str] = deque(maxlen=64)
        self.samples: dict[str, list[autoscale.Sample]] = {r: [] for r in ROLES}
        self.last_change: dict[str, float | None] = {r: None for r in ROLES}
        self.last_decision = {r: "" for r in ROLES}
        self.last_value = {r: 0.0 for r in ROLES}
        self.restarts = 0
        self._tasks: dict[str, asyncio.Task] = {}  # worker id -> its bring-up or drain
        self._failures = {r: 0 for r in ROLES}
        self._retry_at = {r: 0.0 for r in ROLES}
        self._loop: asyncio.Task | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._loop, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.controller.tick_s)
            try:
                self.tick(time.monotonic())
            except Exception:  # noqa: BLE001 - the controller must outlive one bad tick
                log.exception("controller tick failed")

    def tick(self, now: float) -> None:
        self._autoscale(now)
        self.reconcile(now)

    def event(self, msg: str) -> None:
        log.info("controller: %s", msg)
        self.events.append(f"{time.strftime('%H:%M:%S')} {msg}")

    # ---- config ----

    def policy(self, role: str) -> autoscale.Policy | None:
        a = getattr(self.config, role).autoscale
        if a is None:
            return None
        return autoscale.Policy(a.min_replicas, a.max_replicas, a.metric, a.target, a.tolerance,
                                a.up_cooldown_s, a.down_cooldown_s, a.down_window_s)

    def _bounded(self, role: str, n: int) -> int:
        a = getattr(self.config, role).autoscale
        return n if a is None else min(a.max_replicas, max(a.min_replicas, n))

    async def apply(self, text: str, token: str = "", dry_run: bool = False) -> dict:
        """-> {"changes", "message"} or {"code", "error"} (a gRPC status name and its detail)."""
        if self.config.cluster_token and token != self.config.cluster_token:
            return {"code": "PERMISSION_DENIED", "error": "cluster_token: does not match the running cluster's"}
        try:
            new = parse_yaml(text, "applied config")
            changes = plan(self.config, new)
        except ConfigError as e:
            return {"code": "INVALID_ARGUMENT", "error": str(e)}
        except LiveChangeRefused as e:
            return {"code": "FAILED_PRECONDITION", "error": str(e)}
        if dry_run or not changes:
            return {"changes": changes, "message": "dry run: nothing changed" if dry_run else "no changes"}
        self.adopt(new, changes)
        want = ", ".join(f"{r} {self.desired[r]}" for r in ROLES)
        message = f"applied; reconciling to {want}"
        try:
            self.cluster.check_resources(new)
        except RuntimeError as e:  # a Ray autoscaler may still add nodes: warn, do not refuse
            message += f"; warning: {e}; new workers wait until Ray can place them"
        return {"changes": changes, "message": message}

    def adopt(self, new: ClusterConfig, changes: list[str]) -> None:
        old, now = self.config, time.monotonic()
        self.config = self.cluster.config = new
        for role in ROLES:
            o, n = getattr(old, role), getattr(new, role)
            if o.replicas != n.replicas or o.autoscale != n.autoscale:
                self.desired[role] = self._bounded(role, n.replicas)
                self.samples[role], self.last_change[role] = [], now
        self.event("applied: " + "; ".join(changes))
        self.reconcile(now)

    # ---- reconcile ----

    def reconcile(self, now: float) -> None:
        for role in ROLES:
            self._reap_dead(role)
            live = [w for w in self.table.pool(role) if w.state in (STARTING, READY)]
            want = self.desired[role]
            if len(live) < want and now >= self._retry_at[role]:
                for w in self.cluster.spawn_workers(role, want - len(live)):  # EP pools: whole groups
                    self._begin(w, self._bring_up)
            elif len(live) > want:
                for w in sorted(live, key=_order)[: len(live) - want]:
                    self._cancel_start(w) if w.state == STARTING else self._begin(w, self._drain)

    def _begin(self, w: WorkerRef, job) -> None:
        task = asyncio.create_task(job(w))
        self._tasks[w.worker_id] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        for wid, t in list(self._tasks.items()):
            if t is task:
                del self._tasks[wid]

    def _reap_dead(self, role: str) -> None:
        """A worker that died on its own (not one we are retiring) is removed; reconcile replaces it."""
        for w in self.table.pool(role):
            if w.state == DEAD and w.worker_id not in self._tasks:
                self.restarts += 1
                self.event(f"{w.worker_id} died; its requests failed; starting a replacement")
                self._begin(w, self._retire)
                self._retire_peers(w)

    def _retire_peers(self, w: WorkerRef) -> None:
        """The rest of a dead worker's EP group cannot step without it: retire them too; the
        pool is then short by a whole group, and reconcile starts a new one."""
        for wid in self.cluster.group_of(w.worker_id):
            peer = self.table.get(wid)
            if peer is not None and peer is not w and wid not in self._tasks:
                self.event(f"{wid} stopped: its expert-parallel group lost {w.worker_id}")
                peer.state = DEAD
                self._begin(peer, self._retire)

    def _cancel_start(self, w: WorkerRef) -> None:
        task = self._tasks.get(w.worker_id)
        if task is not None:
            task.cancel()
        self.event(f"{w.worker_id} no longer needed while starting; stopped")
        w.state = DEAD
        self._begin(w, self._retire)

    async def _bring_up(self, w: WorkerRef) -> None:
        t0 = time.monotonic()
        self.event(f"{w.worker_id} starting ({w.role})")
        try:
            w.info = await call(w.handle.start.remote(), self.config.controller.start_timeout_s)
            w.status = await call(w.handle.status.remote(), 30)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported, retried with back-off
            self._failures[w.role] += 1
            delay = min(60.0, 2.0 ** self._failures[w.role])
            self._retry_at[w.role] = time.monotonic() + delay
            self.event(f"{w.worker_id} failed to start ({type(e).__name__}: {e}); retry in {delay:.0f}s")
            w.state = DEAD
            self._retire_peers(w)  # an EP group is only whole or gone: its other ranks would block
            await self._retire(w)
            return
        if w.state != STARTING or self.table.get(w.worker_id) is not w:
            return
        self._failures[w.role] = 0
        w.state = READY
        self.cluster.router.ensure_pollers()  # no await since READY: its outputs have a reader
        self.event(f"{w.worker_id} ready after {time.monotonic() - t0:.1f}s; taking traffic")

    async def _drain(self, w: WorkerRef) -> None:
        """Stop routing to `w`, wait until it holds nothing, then stop it."""
        w.state = DRAINING
        self.event(f"{w.worker_id} draining ({w.inflight} requests in flight)")
        t0 = time.monotonic()
        deadline = t0 + self.config.controller.drain_timeout_s
        while time.monotonic() < deadline:
            if w.inflight == 0:
                try:
                    if _idle(await call(w.handle.status.remote(), 10)):
                        break
                except asyncio.TimeoutError:
                    pass  # busy: ask again
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - dead already: nothing left to finish
                    break
            await asyncio.sleep(0.1)
        else:
            self.event(f"{w.worker_id} still busy after {self.config.controller.drain_timeout_s:g}s; "
                       f"stopping it, {w.inflight} requests fail")
        w.state = DEAD
        await self._retire(w)
        self.event(f"{w.worker_id} drained in {time.monotonic() - t0:.1f}s and stopped")

    async def _retire(self, w: WorkerRef) -> None:
        """Take `w` out of the router (requests still on it fail at once) and end its actor."""
        import ray

        self.cluster.router.forget(w.worker_id)
        try:
            await call(w.handle.stop.remote(), 10)
        except Exception:  # noqa: BLE001 - killed below either way
            pass
        ray.kill(w.handle)
        self.table.remove(w.worker_id)
        if not any(self.table.get(wid) for wid in self.cluster.group_of(w.worker_id)):
            self.cluster.release_group(w.worker_id)  # its last rank: free the placement group

    # ---- autoscaling ----

    def _autoscale(self, now: float) -> None:
        ttfts = None
        for role in ROLES:
            pol = self.policy(role)
            if pol is None:
                continue
            if pol.metric == "ttft_p90" and ttfts is None:
                m = self.cluster.metrics
                ttfts = sorted(m.take_ttft()) if m is not None else []
            s = self._sample(role, pol.metric, now, ttfts or [])
            if s is None:
                continue
            self.last_value[role] = s.value
            keep = pol.down_window_s + 1.0
            self.samples[role] = autoscale.prune([*self.samples[role], s], now, keep)
            if any(w.state in (STARTING, DRAINING) for w in self.table.pool(role)):
                continue  # let a resize finish before judging its effect
            d = autoscale.decide(pol, self.samples[role], self.desired[role], self.last_change[role], now)
            if d.changes(self.desired[role]):
                self.event(f"autoscale {role}: {d.reason}")
                self.desired[role], self.last_change[role] = d.replicas, now
                self.last_decision[role] = d.reason
            elif not self.last_decision[role]:
                self.last_decision[role] = d.reason

    def _sample(self, role: str, metric: str, now: float, ttfts: list[float]) -> autoscale.Sample | None:
        ready = [w for w in self.table.pool(role) if w.ready]
        if not ready:
            return None
        if metric == "queue_depth":
            value = pool_queue(ready, role) / len(ready)
        elif metric == "kv_usage":
            value = sum(w.status.get("pages_used", 0) / max(1, w.status.get("pages_total", 1))
                        for w in ready) / len(ready)
        else:
            value = ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else 0.0
        return autoscale.Sample(now, value, len(ready))

    # ---- status ----

    def fill_status(self, out) -> None:
        """Add desired sizes, autoscaling state and recent events to a pb.ClusterStatus."""
        for pool in out.pools:
            pool.desired_replicas = self.desired.get(pool.name, 0)
            pol = self.policy(pool.name)
            if pol is not None:
                a = pool.autoscale
                a.min_replicas, a.max_replicas, a.metric, a.target = (pol.min_replicas, pol.max_replicas,
                                                                      pol.metric, pol.target)
                a.value, a.last_decision = self.last_value[pool.name], self.last_decision[pool.name]
        out.events.extend(self.events)
