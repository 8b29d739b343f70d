"""Cluster subcommands: up, down, status, apply."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path


def _state_file(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"miniinfer-{os.getuid()}" / f"up-{port}.json"


def add_cluster_commands(sub) -> None:
    up = sub.add_parser("up", help="start Ray (or join one), the workers and the router; serve")
    up.add_argument("-c", "--config", required=True, help="cluster YAML (e.g. deploy/local.yaml)")
    up.add_argument("--address", default=None, help="'auto' joins a running Ray cluster (ray start --head)")
    up.add_argument("--port", type=int, default=None, help="override router.port")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the cluster that `miniinfer up` started")
    down.add_argument("--port", type=int, default=50051)
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(func=cmd_down)
    st = sub.add_parser("status", help="pools, workers and KV usage of a running cluster")
    st.add_argument("--address", default="127.0.0.1:50051")
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=10.0)
    st.set_defaults(func=cmd_status)
    ap = sub.add_parser("apply", help="resize a running cluster's pools or change its autoscaling from a config")
    ap.add_argument("-c", "--config", required=True, help="the changed cluster YAML")
    ap.add_argument("--address", default=None, help="router address (default: router.host:port of the file)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the changes; change nothing")
    ap.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for the pools to reach their new size")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.set_defaults(func=cmd_apply)


def cmd_up(args) -> int:
    from cluster.config import ConfigError, load_config
    from cluster.errors import CLIError

    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise CLIError(str(e)) from e
    if args.address:
        config = config.model_copy(update={"ray_address": args.address})
    return asyncio.run(_up(config, args.port))


async def _up(config, port: int | None) -> int:
    from cluster.launch import Cluster

    cluster = Cluster(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    state = None
    try:
        bound = await cluster.start(port)
        # after Ray's init, which installs handlers of its own
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        state = _state_file(bound)
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"pid": os.getpid(), "port": bound, "started": time.time()}))
        print(f"[miniinfer] ready: miniinfer generate --address {config.router.host}:{bound} \"Hello\"  "
              f"(Ctrl-C or `miniinfer down --port {bound}` to stop)", file=sys.stderr, flush=True)
        await stop.wait()
        print("[miniinfer] shutting down", file=sys.stderr, flush=True)
    finally:
        await cluster.stop()
        if state is not None:
            state.unlink(missing_ok=True)
    return 0


def cmd_down(args) -> int:
    from cluster.errors import CLIError

    state = _state_file(args.port)
    if not state.exists():
        raise CLIError(f"no cluster started by `miniinfer up` on port {args.port} (no {state})")
    pid = json.loads(state.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        raise CLIError(f"the cluster process {pid} is gone; removed its stale state file") from None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        # `up` removes its state file as the last step of a clean shutdown
        if not state.exists() or not _alive(pid):
            print(f"stopped cluster on port {args.port}")
            return 0
        time.sleep(0.2)
    raise CLIError(f"cluster process {pid} did not stop within {args.timeout:.0f}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def cmd_status(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from cluster.client import Client
    from cluster.errors import CLIError
    from protos.miniinfer.v1 import miniinfer_pb2 as pb

    client = Client(args.address)  # bearer token / TLS CA from $MINIINFER_API_TOKEN / $MINIINFER_TLS_CA
    try:
        st = client.status(timeout=args.timeout)
    except grpc.RpcError as e:
        raise CLIError(f"cannot reach {args.address}: {e.code().name} {e.details()}") from None
    finally:
        client.close()
    if args.json:
        print(json.dumps(MessageToDict(st), indent=2))
        return 0
    print(f"model {st.model}  kv {st.kv_dtype}  transport {st.kv_transport}  "
          f"active {st.active_requests}  queued {st.queue_depth}")
    print(f"{'pool':8} {'worker':8} {'state':10} {'pages used/total':>17} {'running':>8} {'waiting':>8}")
    for pool in st.pools:
        for w in pool.workers:
            state = pb.WorkerState.Name(w.state).removeprefix("WORKER_STATE_")
            moe = ""
            if w.expert_load:
                moe = f"  experts: imbalance {w.expert_imbalance:.2f} over {len(w.expert_load)} layers"
                moe += f", EP rank {w.ep_rank}/{w.ep_size}" if w.ep_size else ""
            print(f"{pool.name:8} {w.worker_id:8} {state:10} {w.pages_used:>8}/{w.pages_total:<8} "
                  f"{w.running:>8} {w.waiting:>8}{moe}")
    for pool in st.pools:
        a = pool.autoscale
        line = f"{pool.name}: desired {pool.desired_replicas}"
        if pool.HasField("autoscale"):
            line += (f", autoscale {a.min_replicas}..{a.max_replicas} on {a.metric} "
                     f"(now {a.value:.3g}, target {a.target:g}): {a.last_decision}")
        print(line)
    for e in st.events[-8:]:
        print(f"event {e}")
    return 0


def cmd_apply(args) -> int:
    import grpc

    from cluster.config import ConfigError, load_config
    from cluster.errors import CLIError
    from protos.miniinfer.v1 import miniinfer_pb2 as pb

    try:
        config = load_config(args.config)  # the same checks the cluster makes, before any traffic
    except ConfigError as e:
        raise CLIError(str(e)) from e
    address = args.address or f"{config.router.host}:{config.router.port}"
    if address.endswith(":0"):
        raise CLIError(f"{args.config} has router.port 0; give the running cluster's --address")
    req = pb.ApplyConfigRequest(config_yaml=Path(args.config).read_text(), cluster_token=config.cluster_token,
                                dry_run=args.dry_run)
    from cluster.client import Client

    # the config's api_token if it has one, else $MINIINFER_API_TOKEN; TLS CA from $MINIINFER_TLS_CA
    client = Client(address, token=config.router.api_token or None)
    try:
        try:
            res = client.stub.ApplyConfig(req, timeout=args.timeout, metadata=client.metadata)
        except grpc.RpcError as e:
            raise CLIError(f"apply refused by {address}: {e.code().name}: {e.details()}") from None
        for line in res.changes:
            print(f"  {line}")
        print(res.message)
        if args.wait > 0 and res.changes and not args.dry_run:
            _wait_settled(client, args.wait)
    finally:
        client.close()
    return 0


def _settled(st) -> bool:
    from protos.miniinfer.v1 import miniinfer_pb2 as pb

    return all(len(p.workers) == p.desired_replicas and all(w.state == pb.WORKER_STATE_READY for w in p.workers)
               for p in st.pools)


def _wait_settled(client, timeout: float) -> None:
    import grpc

    from cluster.errors import CLIError

    deadline = time.monotonic() + timeout
    while True:
        try:
            st = client.status(timeout=10)
        except grpc.RpcError as e:
            raise CLIError(f"lost the cluster while waiting: {e.code().name} {e.details()}") from None
        if _settled(st):
            sizes = ", ".join(f"{p.name} {len(p.workers)}" for p in st.pools)
            print(f"settled: {sizes}")
            return
        if time.monotonic() > deadline:
            raise CLIError(f"pools not settled after {timeout:g}s; see `miniinfer status`")
        time.sleep(0.5)
