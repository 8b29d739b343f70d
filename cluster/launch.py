"""Bring a cluster up: Ray, the worker actors, the router. And take it down again."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field, replace

from cluster.config import ClusterConfig
from kvtransfer.worker_spec import WorkerSpec
from router.server import Router, RouterConfig, serve
from router.validate import Limits
from router.workers import DEAD, READY, WorkerRef, WorkerTable, call

log = logging.getLogger(__name__)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[miniinfer] {msg}", file=sys.stderr, flush=True)


def init_ray(config: ClusterConfig, quiet: bool = False) -> bool:
    """Start a local Ray bound to loopback, or join `ray_address`. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = config.ray_address
    if addr and addr != "local":
        _say(f"joining Ray cluster at {addr}", quiet)
        ray.init(address=addr, namespace="miniinfer", log_to_driver=not quiet)
        return False
    # room for the largest size autoscaling may reach, plus one worker per pool replacing another
    need = sum((p.max_workers + 1) * p.cpus_per_worker for p in (config.prefill, config.decode))
    cpus = max(os.cpu_count() or 1, int(need + 0.999) + 2)
    _say(f"starting a local Ray instance on 127.0.0.1 ({cpus} logical CPUs)", quiet)
    ray.init(num_cpus=cpus, include_dashboard=False, namespace="miniinfer", _node_ip_address="127.0.0.1",
             log_to_driver=not quiet, configure_logging=False)
    return True


def worker_spec(config: ClusterConfig, role: str) -> WorkerSpec:
    pool = getattr(config, role)
    return WorkerSpec(
        model=config.model, dtype=config.dtype, kv_dtype=config.kv_dtype, device=config.device,
        num_pages=pool.num_pages, max_num_seqs=pool.max_num_seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens, transport=config.transport,
        torch_threads=pool.torch_threads, cuda_graphs=pool.cuda_graphs, run_ahead=pool.run_ahead,
        cluster_token=config.cluster_token or _SESSION_TOKEN,
        transfer_timeout_s=config.limits.transfer_timeout_s, dummy_weights=config.dummy_weights,
        kv_host=config.kv_host,
        max_queue=config.limits.max_worker_requests,
        speculative=pool.speculative.model_dump() if pool.speculative is not None else None,
    )


def _pick_ep_address(spec: WorkerSpec) -> str:
    """Run on an EP group's rank-0 node (a Ray task in its bundle): a free host:port there
    for the group's TCPStore, which rank 0 then hosts."""
    import socket

    host = spec.kv_bind_host()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


# With no cluster_token configured, the internal KV service still refuses strangers: this
# process makes one up, and every worker it starts gets it.
_SESSION_TOKEN = secrets.token_hex(16)


@dataclass
class Cluster:
    config: ClusterConfig
    quiet: bool = False
    table: WorkerTable = field(default_factory=WorkerTable)
    router: Router | None = None
    server: object = None
    port: int = 0
    started_ray: bool = False
    controller: object = None  # cluster.controller.Controller once serving
    metrics: object = None  # cluster.metrics.Metrics when config.metrics.port is set
    metrics_port: int = 0
    _next_id: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    groups: dict = field(default_factory=dict)  # EP group id -> (placement group, its worker ids by rank)

    def _actor_class(self, role: str, **placement):
        import ray

        from decode.worker import DecodeWorker
        from prefill.worker import PrefillWorker

        cls = PrefillWorker if role == "prefill" else DecodeWorker
        pool = getattr(self.config, role)
        return ray.remote(cls).options(num_cpus=pool.cpus_per_worker, num_gpus=pool.gpus_per_worker,
                                       max_concurrency=4096, max_restarts=0, **placement)

    def spawn(self, role: str, spec: WorkerSpec | None = None, **placement) -> WorkerRef:
        """Create one worker actor (it loads the model in its constructor)."""
        wid = f"{role[0]}{self._next_id[role]}"
        self._next_id[role] += 1
        handle = self._actor_class(role, **placement).remote(wid, spec or worker_spec(self.config, role))
        ref = WorkerRef(wid, role, handle)
        self.table.add(ref)
        return ref

    def spawn_workers(self, role: str, n: int) -> list[WorkerRef]:
        """n workers of a pool: single workers, or n / ep_size whole expert-parallel groups."""
        ep_size = getattr(self.config, role).ep_size
        if ep_size == 1:
            return [self.spawn(role) for _ in range(n)]
        return [ref for _ in range(n // ep_size) for ref in self.spawn_group(role)]

    def spawn_group(self, role: str) -> list[WorkerRef]:
        """One expert-parallel group: a placement group with one bundle per rank on one node
        (STRICT_PACK), an actor per bundle. Rank 0's TCPStore address is picked by a task in
        rank 0's bundle and reaches every rank as an ObjectRef, so nothing here blocks."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pool = getattr(self.config, role)
        bundle = {"CPU": pool.cpus_per_worker, **({"GPU": pool.gpus_per_worker} if pool.gpus_per_worker else {})}
        pg = placement_group([bundle] * pool.ep_size, strategy="STRICT_PACK")
        base = worker_spec(self.config, role)
        at = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r) for r in range(pool.ep_size)]
        address = ray.remote(_pick_ep_address).options(num_cpus=0, scheduling_strategy=at[0]).remote(base)
        refs = [self.spawn(role, replace(base, ep_rank=r, ep_size=pool.ep_size, ep_address=address),
                           scheduling_strategy=at[r]) for r in range(pool.ep_size)]
        self.groups[f"{role}-ep{refs[0].worker_id}"] = (pg, [r.worker_id for r in refs])
        return refs

    def group_of(self, worker_id: str) -> list[str]:
        """The worker ids of `worker_id`'s EP group, by rank ([] for a worker in no group)."""
        return next((ids for _, ids in self.groups.values() if worker_id in ids), [])

    def release_group(self, worker_id: str) -> None:
        """Forget `worker_id`'s EP group and free its placement group (its actors are gone)."""
        from ray.util.placement_group import remove_placement_group

        for gid, (pg, ids) in list(self.groups.items()):
            if worker_id in ids:
                del self.groups[gid]
                remove_placement_group(pg)

    async def wait_ready(self, refs: list[WorkerRef], timeout_s: float = 600.0) -> None:
        """Start each worker (receivers, engine thread) and wait until all report ready."""
        t0 = time.monotonic()
        pending = {asyncio.ensure_future(call(r.handle.start.remote(), timeout_s)): r for r in refs}
        done_count = 0
        while pending:
            done, _ = await asyncio.wait(pending, timeout=max(0.1, timeout_s - (time.monotonic() - t0)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError(f"workers not ready after {timeout_s:.0f}s: {[r.worker_id for r in pending.values()]}")
            for fut in done:
                r = pending.pop(fut)
                try:
                    r.info = fut.result()
                except Exception as e:
                    r.state = DEAD
                    raise RuntimeError(f"worker {r.worker_id} failed to start: {e}") from e
                r.state = READY
                done_count += 1
                _say(f"worker {r.worker_id} ready after {time.monotonic() - t0:.1f}s "
                     f"({done_count}/{len(refs)})", self.quiet)

    def check_resources(self, config: ClusterConfig | None = None) -> None:
        """Fail at once, naming the shortfall, if the Ray cluster can never place the pools."""
        import ray

        total = ray.cluster_resources()
        c = config or self.config
        for res, need in (
            ("CPU", c.prefill.replicas * c.prefill.cpus_per_worker + c.decode.replicas * c.decode.cpus_per_worker),
            ("GPU", c.prefill.replicas * c.prefill.gpus_per_worker + c.decode.replicas * c.decode.gpus_per_worker),
        ):
            if need > total.get(res, 0) + 1e-9:
                raise RuntimeError(f"the pools need {need:g} {res} but the Ray cluster has "
                                   f"{total.get(res, 0):g}; lower replicas or *_per_worker")

    async def start(self, port: int | None = None) -> int:
        from engine.loader.registry import load_tokenizer

        t0 = time.monotonic()
        self.started_ray = await asyncio.to_thread(init_ray, self.config, self.quiet)
        self.check_resources()
        refs = self.spawn_workers("prefill", self.config.prefill.replicas)
        refs += self.spawn_workers("decode", self.config.decode.replicas)
        _say(f"starting {len(refs)} workers (model {self.config.model}, kv {self.config.kv_dtype}, "
             f"transport {self.config.transport})", self.quiet)
        tokenizer, mcfg = await asyncio.to_thread(load_tokenizer, self.config.model)
        if tokenizer is None:
            raise RuntimeError(f"model {self.config.model} has no tokenizer; the router needs one")
        await self.wait_ready(refs)
        lim = self.config.limits
        limits = Limits(max_model_len=mcfg.max_position, vocab_size=mcfg.vocab_size,
                        max_prompt_tokens=lim.max_prompt_tokens, max_tokens=lim.max_tokens,
                        default_max_tokens=lim.default_max_tokens, max_stop_strings=lim.max_stop_strings,
                        max_stop_string_chars=lim.max_stop_string_chars)
        rcfg = RouterConfig(model=self.config.model, kv_dtype=self.config.kv_dtype,
                            transport=self.config.transport, request_timeout_s=lim.request_timeout_s,
                            transfer_timeout_s=lim.transfer_timeout_s,
                            max_active_requests=lim.max_active_requests, max_retries=lim.max_retries,
                            colocated=self.config.mode == "colocated")
        self.router = Router(rcfg, tokenizer, limits, self.table)
        host = self.config.router.host
        rs = self.config.router
        self.server, self.port = await serve(self.router, host, rs.port if port is None else port,
                                             max_message_bytes=lim.max_message_bytes, api_token=rs.api_token,
                                             tls_cert=rs.tls_cert, tls_key=rs.tls_key)
        await self._start_operations()
        _say(f"serving on {host}:{self.port} ({time.monotonic() - t0:.1f}s to ready)", self.quiet)
        return self.port

    async def _start_operations(self) -> None:
        """The controller (apply, autoscaling, restarts) and the Prometheus endpoint."""
        from cluster.controller import Controller
        from cluster.metrics import Metrics

        self.controller = Controller(self)
        self.router.controller = self.controller
        await self.controller.start()
        m = self.config.metrics
        if m.port is not None:
            self.metrics = Metrics(self.table, self.router, self.controller)
            self.router.metrics = self.metrics
            self.metrics_port = self.metrics.serve(m.host, m.port)
            _say(f"metrics on http://{m.host}:{self.metrics_port}/metrics", self.quiet)

    async def stop(self) -> None:
        import ray

        if self.controller is not None:
            await self.controller.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.server is not None:
            await self.server.stop(2.0)
        if self.router is not None:
            await self.router.stop()
        for w in list(self.table.workers.values()):
            try:
                await call(w.handle.stop.remote(), 10)
            except Exception:  # noqa: BLE001 - killing it anyway
                pass
            ray.kill(w.handle)
            self.table.remove(w.worker_id)
        for wid in [ids[0] for _, ids in self.groups.values()]:
            self.release_group(wid)
        if self.started_ray:
            ray.shutdown()
