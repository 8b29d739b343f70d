"""KV transfer between a prefill process and a decode process: NCCL pairwise group vs gRPC.

Two processes (rank 0 = prefill on cuda:0, rank 1 = decode on cuda:1; gloo on CPU with
--device cpu). Each holds a paged KV cache of a Llama-3-8B-shaped model (32 layers, 8 KV
heads, head_dim 128) and moves the KV of one prompt of N tokens, scattered over random
pages, with the product's own functions:

- export: `export_pages` on the sender (gather the prompt's pages into one payload; in the
  product this runs inside the prefill step, so it is reported apart from the transfer)
- nccl (ours): `send_tensors` / `recv_tensors` over a `make_pair_group` pairwise group, then
  `import_pages` (scatter into the receiver's pages); timed on the receiver from a barrier
  to the import being done
- nccl (raw): one send/recv of a uint8 tensor of the same byte count on the same group
- grpc: `GrpcKVSender.send` into a `KVReceiverService` in the decode process (chunked
  stream, bytes through host memory), commit = the same import; timed on the sender until
  the receiver's ack

Bandwidth = payload bytes / time. The receiver checks every transferred page against the
sender's values once per configuration (a wrong transfer fails the run).

    python bench/kv_transfer.py [--tokens 512,4096,16384] [--kv bf16,int8] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JsonLines, format_table, progress
from engine.kv_cache import KV_DTYPES, KVCache, KVCacheSpec
from engine.page_pool import pages_needed
from kvtransfer.layout import KVPayload, export_pages, import_pages, make_header, payload_shapes
from kvtransfer.torch_transport import (
    make_pair_group,
    recv_tensors,
    send_tensors,
    wait_work,
    wire_tensors,
)

SHAPES = {
    "llama3-8b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128},
    "tiny": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16},  # CPU smoke test
}
TIMEOUT_S = 60.0


def _fill(cache: KVCache, seed: int) -> None:
    """Deterministic contents, identical on both ranks for the same seed and device type."""
    g = torch.Generator(device=cache.data.device).manual_seed(seed)
    if cache.quantized:
        cache.data.copy_(torch.randint(-127, 128, cache.data.shape, generator=g, device=cache.data.device,
                                       dtype=torch.int8))
        cache.scales.copy_(torch.rand(cache.scales.shape, generator=g, device=cache.data.device))
    else:
        cache.data.copy_(torch.randn(cache.data.shape, generator=g, device=cache.data.device,
                                     dtype=cache.data.dtype))


def _sync(device: torch.device) -> None:
    # this thread's stream only: a device-wide sync would also wait for a pending NCCL op of
    # the other thread (the barrier), which waits for the peer, which waits for our gRPC ack
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _barrier(group, device: torch.device) -> None:
    t = torch.ones(1, device=device)
    group.allreduce([t]).wait(datetime.timedelta(seconds=TIMEOUT_S))
    _sync(device)


def _raw_once(group, rank: int, buf: torch.Tensor) -> None:
    """One send/recv of a preallocated buffer, waited for like the product waits."""
    if rank == 0:
        send_tensors(group, [buf], 1, TIMEOUT_S)
        return
    wait_work(group.recv([buf], 0, 4), TIMEOUT_S, buf.device)


def _ours_once(group, rank: int, payload, shapes, cache: KVCache, dst_pages: list[int]) -> None:
    """One KV transfer as the workers run it: send / receive + import into the decode cache."""
    if rank == 0:
        send_tensors(group, wire_tensors(payload), 2, TIMEOUT_S)
        return
    got = recv_tensors(group, shapes, cache.data.device, 2, TIMEOUT_S)
    import_pages(cache, dst_pages, KVPayload.from_tensors(got))


def _timed(group, device, iters: int, batch: int, once, *args) -> float:
    """Median seconds per transfer: `batch` transfers back to back after a barrier, per sample
    (amortizes the barrier's skew), first sample dropped (warm-up)."""
    times = []
    for _ in range(iters + 1):
        _barrier(group, device)
        t0 = time.perf_counter()
        for _ in range(batch):
            once(*args)
        _sync(device)
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times[1:])


def _pages_for(tokens: int, num_pages: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_pages, generator=g)[: pages_needed(tokens, 16)].tolist()


class _Receiver:
    """The decode process's gRPC KV receiver (its own event loop on a thread).

    Its commit only keeps the assembled bytes; the main thread imports them into the cache
    (GPU work stays on one thread, and no NCCL op is pending while gRPC runs)."""

    def __init__(self, cache: KVCache) -> None:
        from kvtransfer.grpc_transport import KVReceiverService, start_receiver_server

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.blob: bytes | None = None

        async def commit(h, blob):
            self.blob = blob

        service = KVReceiverService(validate=lambda h: None, commit=commit, cancel=lambda t, r: True)
        self.server, self.address = asyncio.run_coroutine_threadsafe(
            start_receiver_server(service), self.loop).result(30)

    def import_into(self, cache: KVCache, pages: list[int], tokens: int) -> None:
        from kvtransfer.layout import payload_from_bytes

        import_pages(cache, pages, payload_from_bytes(cache, tokens, self.blob))
        _sync(cache.data.device)
        self.blob = None

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _store_wait(store, key: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"peer did not set {key} within {timeout_s:.0f}s")
        time.sleep(0.0005)


def _worker(rank: int, args, port: int) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    group = make_pair_group(store, "kvbench", rank, device, TIMEOUT_S)
    shape = SHAPES[args.shape]
    max_tokens = max(args.tokens)
    results = []
    for kv in args.kv:
        dtype = KV_DTYPES[kv]
        num_pages = pages_needed(max_tokens, 16) * 2
        cache = KVCache(KVCacheSpec(num_pages=num_pages, dtype=dtype, **shape), device)
        if rank == 0:
            _fill(cache, seed=1)
        receiver = _Receiver(cache) if rank == 1 and args.grpc else None
        if rank == 1:
            store.set(f"grpc/{kv}", receiver.address if receiver else "")
        grpc_address = store.get(f"grpc/{kv}").decode()
        for tokens in args.tokens:
            src_pages = _pages_for(tokens, num_pages, seed=tokens)
            dst_pages = _pages_for(tokens, num_pages, seed=tokens + 1)
            rec = {"tokens": tokens, "kv": kv, "shape": args.shape}
            shapes = payload_shapes(cache, tokens)
            nbytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in shapes)
            rec["bytes"] = nbytes
            progress(f"rank {rank}: {kv} {tokens} tokens ({nbytes / 2**20:.1f} MiB)")

            # export (sender only; part of the prefill step in the product)
            payload = None
            if rank == 0:
                times = []
                for _ in range(args.iters + 1):
                    _sync(device)
                    t0 = time.perf_counter()
                    payload = export_pages(cache, src_pages, tokens)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                rec["export_s"] = statistics.median(times[1:])

            # raw NCCL/gloo: one tensor of the same byte count, preallocated on both sides
            raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
            rec["raw_s"] = _timed(group, device, args.iters, args.batch, _raw_once, group, rank, raw)
            del raw

            # ours: the product's send/recv + import into scattered pages
            rec["ours_s"] = _timed(group, device, args.iters, args.batch, _ours_once, group, rank, payload,
                                   shapes, cache, dst_pages)
            if rank == 1:
                rec["verified"] = _verify(cache, dst_pages, tokens, shape, kv, device)

            # gRPC: the product's chunked stream (host memory both sides), same import.
            # Paced through the store, not NCCL: nothing else is in flight while it runs.
            if args.grpc and nbytes <= args.grpc_max_bytes:
                key = f"grpc/{kv}/{tokens}"
                if rank == 1:
                    cache.data.zero_()  # so the check below sees what gRPC delivered
                    if cache.quantized:
                        cache.scales.zero_()
                    _sync(device)
                _barrier(group, device)
                if rank == 0:
                    from kvtransfer.grpc_transport import GrpcKVSender

                    ticket = types.SimpleNamespace(grpc_address=grpc_address, decode_id="bench")
                    header = make_header(cache, payload, "bench", "t", tokens, 0, with_checksum=False)

                    async def push(ticket, header, payload) -> float:
                        sender = GrpcKVSender()
                        t0 = time.perf_counter()
                        await sender.send(ticket, header, payload, TIMEOUT_S)
                        dt = time.perf_counter() - t0
                        await sender.close()
                        return dt

                    rec["grpc_push_s"] = asyncio.run(push(ticket, header, payload))
                    store.set(key + "/pushed", "1")
                    _store_wait(store, key + "/imported")
                else:
                    _store_wait(store, key + "/pushed")
                    t0 = time.perf_counter()
                    receiver.import_into(cache, dst_pages, tokens)
                    rec["grpc_import_s"] = time.perf_counter() - t0
                    rec["grpc_verified"] = _verify(cache, dst_pages, tokens, shape, kv, device)
                    store.set(key + "/imported", "1")
            del payload
            store.set(f"rec/{rank}/{kv}/{tokens}", json.dumps(rec))
            _barrier(group, device)
            if rank == 0:
                r = {**json.loads(store.get(f"rec/1/{kv}/{tokens}")), **rec}
                if "grpc_push_s" in r:  # push (until the receiver's ack) + the receiver's import
                    r["grpc_s"] = r["grpc_push_s"] + r["grpc_import_s"]
                results.append(r)
        if receiver is not None:
            receiver.close()
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        store.set("results", json.dumps(results))
    _barrier(group, device)


def _verify(cache: KVCache, dst_pages, tokens, shape, kv, device) -> bool:
    """The receiver's pages hold exactly what the sender's source pages held."""
    ref = KVCache(KVCacheSpec(num_pages=cache.spec.num_pages, dtype=cache.spec.dtype, **shape), device)
    _fill(ref, seed=1)
    src_pages = _pages_for(tokens, cache.spec.num_pages, seed=tokens)
    n = pages_needed(tokens, 16)
    src = torch.tensor(src_pages[:n], device=device)
    dst = torch.tensor(dst_pages[:n], device=device)
    ok = torch.equal(cache.data.index_select(2, dst), ref.data.index_select(2, src))
    if cache.quantized:
        ok = ok and torch.equal(cache.scales.index_select(2, dst), ref.scales.index_select(2, src))
    del ref
    if not ok:
        raise AssertionError(f"KV mismatch after transfer ({kv}, {tokens} tokens)")
    return True


def _gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 1e9


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="512,4096,16384")
    p.add_argument("--kv", default="bf16,int8")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: llama3-8b (tiny on cpu)")
    p.add_argument("--iters", type=int, default=5, help="timed samples per measurement")
    p.add_argument("--batch", type=int, default=4, help="transfers back to back per sample")
    p.add_argument("--no-grpc", dest="grpc", action="store_false")
    p.add_argument("--grpc-max-bytes", type=float, default=4 * 2**30)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run (s)")
    p.add_argument("--json", default=os.environ.get("KV_TRANSFER_JSON"))
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.kv = args.kv.split(",")
    args.shape = args.shape or ("llama3-8b" if args.device == "cuda" else "tiny")
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("kv_transfer: needs two GPUs (or --device cpu)")

    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = mp.start_processes(_worker, args=(args, store.port), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + args.timeout
    while not ctx.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            sys.exit(f"kv_transfer: no result within {args.timeout:.0f}s")
    results = json.loads(store.get("results"))
    out = JsonLines(args.json)
    rows = []
    for r in results:
        n = r["bytes"]
        r.update(raw_gbps=_gbps(n, r["raw_s"]), ours_gbps=_gbps(n, r["ours_s"]),
                 grpc_gbps=_gbps(n, r.get("grpc_s")))
        r["ours_vs_raw"] = r["ours_gbps"] / r["raw_gbps"]
        out.emit(r)
        rows.append([r["kv"], r["tokens"], f"{n / 2**20:.1f}", f"{r['export_s'] * 1e3:.3f}",
                     f"{r['raw_s'] * 1e3:.3f}", f"{r['raw_gbps']:.1f}", f"{r['ours_s'] * 1e3:.3f}",
                     f"{r['ours_gbps']:.1f}", f"{100 * r['ours_vs_raw']:.0f}%",
                     "-" if r.get("grpc_s") is None else f"{r['grpc_gbps']:.2f}"])
    print(format_table(["kv", "tokens", "MiB", "export ms", "raw ms", "raw GB/s", "ours ms", "ours GB/s",
                        "ours/raw", "grpc GB/s"], rows))
    return results


if __name__ == "__main__":
    main()
