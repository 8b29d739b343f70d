"""Prometheus metrics of a running cluster, served over HTTP (127.0.0.1 by default).

Two sources feed one registry (per cluster, never the global one):
- the router observes every request as it finishes: TTFT, TPOT and end-to-end
  histograms, and finished/failed counters;
- a collector reads, at scrape time, the status each worker last reported to the
  router (refreshed every `status_interval_s`): queues, running batch, KV pages,
  KV transfers, graph-replayed vs eager steps, MoE expert load when a worker has it.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)


class WorkerCollector:
    """Series derived from the worker table's last statuses, built at scrape time."""

    def __init__(self, table, router=None, controller=None) -> None:
        self.table, self.router, self.controller = table, router, controller

    def describe(self):
        return []  # unchecked collector: series come and go with workers

    def collect(self):
        workers = list(self.table.workers.values())
        g = {name: GaugeMetricFamily(f"miniinfer_{name}", doc, labels=["pool", "worker"]) for name, doc in (
            ("worker_ready", "1 while the worker takes new requests"),
            ("worker_running", "requests in the worker's running batch"),
            ("worker_waiting", "requests admitted by the worker, waiting for its batch"),
            ("kv_pages_used", "KV cache pages in use"),
            ("kv_pages_free", "KV cache pages free"),
        )}
        steps = CounterMetricFamily("miniinfer_engine_steps", "engine steps by how they ran",
                                    labels=["pool", "worker", "mode"])
        failures = CounterMetricFamily("miniinfer_kv_transfer_failures", "KV transfers that failed",
                                       labels=["pool", "worker"])
        sent = CounterMetricFamily("miniinfer_kv_transfer_bytes", "KV bytes pushed to decode workers",
                                   labels=["worker"])
        latency = SummaryMetricFamily("miniinfer_kv_transfer_seconds", "KV push latency (prefill side)",
                                      labels=["worker"])
        experts = GaugeMetricFamily("miniinfer_moe_expert_load", "tokens routed to each expert since the worker started",
                                    labels=["worker", "layer", "expert"])
        skew = GaugeMetricFamily("miniinfer_moe_expert_imbalance",
                                 "max/mean tokens per expert, worst MoE layer (1 = even, 0 = no tokens yet)", labels=["worker"])
        for w in workers:
            s, lab = w.status, [w.role, w.worker_id]
            g["worker_ready"].add_metric(lab, 1.0 if w.ready else 0.0)
            for name, key in (("worker_running", "running"), ("worker_waiting", "waiting"),
                              ("kv_pages_used", "pages_used"), ("kv_pages_free", "pages_free")):
                g[name].add_metric(lab, s.get(key, 0))
            graph = s.get("graph_steps", 0)
            steps.add_metric([*lab, "graph"], graph)
            steps.add_metric([*lab, "eager"], max(0, s.get("steps", 0) - graph))
            failures.add_metric(lab, s.get("transfers_failed", 0))
            if w.role == "prefill":
                sent.add_metric([w.worker_id], s.get("transfer_bytes", 0))
                latency.add_metric([w.worker_id], s.get("transfers_ok", 0), s.get("transfer_seconds", 0.0))
            self._experts(experts, w.worker_id, s.get("expert_load"))
            if "expert_imbalance" in s:
                skew.add_metric([w.worker_id], float(s["expert_imbalance"]))
        yield from g.values()
        yield from (steps, failures, sent, latency, experts, skew)
        yield from self._pools(workers)

    @staticmethod
    def _experts(family, worker_id: str, load) -> None:
        """`expert_load` is a list of per-layer lists of counts (or one flat list)."""
        if not load:
            return
        rows = load if isinstance(load[0], (list, tuple)) else [load]
        for layer, row in enumerate(rows):
            for e, n in enumerate(row):
                family.add_metric([worker_id, str(layer), str(e)], float(n))

    def _pools(self, workers):
        queue = GaugeMetricFamily("miniinfer_queue_depth", "requests waiting in each pool", labels=["pool"])
        desired = GaugeMetricFamily("miniinfer_pool_desired_replicas", "workers the controller aims for",
                                    labels=["pool"])
        for role in ("prefill", "decode"):
            queue.add_metric([role], float(pool_queue(workers, role)))
            if self.controller is not None:
                desired.add_metric([role], float(self.controller.desired.get(role, 0)))
        yield queue
        yield desired
        if self.router is not None:
            active = GaugeMetricFamily("miniinfer_active_requests", "requests admitted by the router")
            active.add_metric([], float(len(self.router.active)))
            yield active
            retries = CounterMetricFamily("miniinfer_request_retries", "re-prefills after a lost leg")
            retries.add_metric([], float(self.router.retries))
            yield retries
            orphans = CounterMetricFamily("miniinfer_orphan_legs_reaped",
                                          "legs a worker ran with no request owning them, aborted by the router")
            orphans.add_metric([], float(self.router.orphans_reaped))
            yield orphans


def pool_queue(workers, role: str) -> int:
    """Requests waiting in a pool: for prefill, sent and not yet answered (the router's count);
    for decode, admitted but not yet in a batch, plus KV transfers still on their way."""
    live = [w for w in workers if w.role == role and w.state != "DEAD"]
    if role == "prefill":
        return sum(w.inflight for w in live)
    return sum(w.status.get("waiting", 0) + w.status.get("pending_transfers", 0) for w in live)


class Metrics:
    """The registry, the router's request observations, and the HTTP endpoint."""

    def __init__(self, table, router=None, controller=None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("miniinfer_ttft_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("miniinfer_tpot_seconds", "time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("miniinfer_e2e_seconds", "request latency, first byte in to last out",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("miniinfer_requests_finished", "requests that finished, by reason",
                                ["reason"], registry=r)
        self.failed = Counter("miniinfer_requests_failed", "requests that ended with a gRPC error, by code",
                              ["code"], registry=r)
        self.tokens = Counter("miniinfer_generated_tokens", "tokens streamed to clients", registry=r)
        self.recent_ttft: list[float] = []  # for the autoscaler's ttft_p90 (bounded)
        r.register(WorkerCollector(table, router, controller))
        self._server = self._thread = None
        self.port = 0

    def observe_request(self, ttft_s: float, e2e_s: float, num_tokens: int, reason: str) -> None:
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        if num_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (num_tokens - 1))
        self.finished.labels(reason).inc()
        self.tokens.inc(num_tokens)
        self.recent_ttft.append(ttft_s)
        del self.recent_ttft[:-256]

    def observe_failure(self, code: str) -> None:
        self.failed.labels(code).inc()

    def take_ttft(self) -> list[float]:
        """TTFTs since the last call (the autoscaler samples them once per tick)."""
        out, self.recent_ttft = self.recent_ttft, []
        return out

    def serve(self, host: str, port: int) -> int:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
