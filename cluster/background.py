"""A cluster running on a background event loop, driven from synchronous code (tests, benches)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from protos.miniinfer.v1 import miniinfer_pb2 as pb
from protos.miniinfer.v1 import miniinfer_pb2_grpc as pb_grpc


class BackgroundCluster:
    def __init__(self, config, quiet: bool = True, start_timeout_s: float = 600) -> None:
        from cluster.launch import Cluster

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cluster = Cluster(config, quiet=quiet)
        try:
            self.port = self.run(self.cluster.start(port=0), timeout=start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.MiniInferStub(self.channel)

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def status(self) -> pb.ClusterStatus:
        return self.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)

    def wait_pools_full(self, timeout: float = 15.0) -> pb.ClusterStatus:
        """Poll until every worker's pages are free and nothing is active (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st.active_requests == 0 and all(
                w.pages_free == w.pages_total and w.running == 0 and w.waiting == 0
                for p in st.pools for w in p.workers
            ):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"pools not full after {timeout}s:\n{st}")
            time.sleep(0.2)

    def close(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        try:
            self.run(self.cluster.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
