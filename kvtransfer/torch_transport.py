"""torch.distributed KV transport: one pairwise process group per (prefill, decode) pair.

Groups are created on first use, with no global `init_process_group`: the decode worker
hosts a TCPStore; both sides build `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL` (GPU)
over `PrefixStore("<prefill>/<decode>/<epoch>", store)` as ranks 0 (sender) and 1
(receiver). The same code runs on both backends. A worker keeps at most `max_pairs`
groups (least recently used are dropped).
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections import OrderedDict

import torch
import torch.distributed as dist

from kvtransfer import faults
from kvtransfer.base import KVSender
from kvtransfer.layout import KVHeader, KVPayload, KVTransferError
from kvtransfer.ticket import Ticket

SENDER, RECEIVER = 0, 1


def new_store(host: str = "127.0.0.1") -> tuple[dist.TCPStore, str]:
    """A TCPStore server on a free port; returns it and its host:port."""
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    return store, f"{host}:{store.port}"


def connect_store(address: str, timeout_s: float) -> dist.TCPStore:
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def make_pair_group(store, prefix: str, rank: int, device: torch.device, timeout_s: float):
    """Build one side of a 2-rank group. Blocks until the peer builds its side (or times out)."""
    pstore = dist.PrefixStore(prefix, store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(pstore, rank, 2, opts)
    return dist.ProcessGroupGloo(pstore, rank, 2, timeout)


def wire_tensors(payload: KVPayload) -> list[torch.Tensor]:
    """What goes on the wire: int8 pages travel as uint8 (NCCL has int8, gloo has uint8)."""
    return [t.contiguous() for t in payload.tensors()]


class PairGroups:
    """LRU of pairwise groups keyed by peer; creation serialized per peer."""

    def __init__(self, max_pairs: int = 16) -> None:
        self.max_pairs = max_pairs
        self._groups: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            g = self._groups.get(key)
            if g is not None:
                self._groups.move_to_end(key)
            return g

    def put(self, key: str, group) -> None:
        with self._lock:
            self._groups[key] = group
            while len(self._groups) > self.max_pairs:
                self._groups.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._groups.pop(key, None)

    def __len__(self) -> int:
        return len(self._groups)


def wait_work(work, timeout_s: float, device: torch.device) -> None:
    """Block this (transfer) thread until a send/recv is done; bounded by `timeout_s`."""
    if device.type == "cuda":
        # NCCL: order the current stream after the op, then sync that stream. (A timed
        # `work.wait(timeout)` polls in 1 ms sleeps, a floor that dominates small transfers.)
        # The bound is the group's own timeout (make_pair_group), after which NCCL's watchdog
        # aborts the communicator and the op ends with an error.
        work.wait()
        torch.cuda.current_stream(device).synchronize()
        return
    if work.wait(datetime.timedelta(seconds=timeout_s)) is False:
        raise KVTransferError("torch.distributed transfer timed out")


def send_tensors(group, tensors: list[torch.Tensor], tag: int, timeout_s: float) -> None:
    # post every send, then wait: int8 pages and their scales go back to back, with no
    # host round trip between them (both sides post in the same order)
    works = [group.send([t], RECEIVER, tag * 4 + i) for i, t in enumerate(tensors)]
    for w, t in zip(works, tensors):
        wait_work(w, timeout_s, t.device)


def recv_tensors(group, shapes, device, tag: int, timeout_s: float) -> list[torch.Tensor]:
    out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
    works = [group.recv([t], SENDER, tag * 4 + i) for i, t in enumerate(out)]
    for w, t in zip(works, out):
        wait_work(w, timeout_s, t.device)
    return out


class TorchKVSender(KVSender):
    """Prefill side. The decode worker's Ray handle posts the matching receive."""

    name = "torch"

    def __init__(self, worker_id: str, device: torch.device, max_pairs: int = 16,
                 connect_timeout_s: float = 60.0) -> None:
        self.worker_id = worker_id
        self.device = device
        self.pairs = PairGroups(max_pairs)
        self.connect_timeout_s = connect_timeout_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation: dict[str, int] = {}  # peer -> bumps when its group broke

    def _key(self, ticket: Ticket) -> str:
        # A rebuilt group gets a new key, hence a fresh TCPStore prefix: a stale rendezvous or a
        # half-used communicator is never picked up again (a restarted peer has a new id/epoch).
        gen = self._generation.get(ticket.decode_id, 0)
        return f"{self.worker_id}/{ticket.decode_id}/{ticket.epoch}/{gen}"

    def _drop(self, ticket: Ticket, key: str) -> None:
        self.pairs.drop(key)
        self._generation[ticket.decode_id] = self._generation.get(ticket.decode_id, 0) + 1

    async def _group(self, ticket: Ticket):
        key = self._key(ticket)
        g = self.pairs.get(key)
        if g is not None:
            return g, key
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            g = self.pairs.get(key)
            if g is None:
                peer = ticket.decode_handle.open_pair.remote(key)
                store = await asyncio.to_thread(connect_store, ticket.store_address, self.connect_timeout_s)
                g = await asyncio.to_thread(make_pair_group, store, key, SENDER, self.device,
                                            self.connect_timeout_s)
                await asyncio.wait_for(peer, self.connect_timeout_s)
                self.pairs.put(key, g)
        return g, key

    async def send(self, ticket: Ticket, header: KVHeader, payload: KVPayload, timeout: float) -> None:
        try:
            group, key = await asyncio.wait_for(self._group(ticket), timeout)
        except Exception as e:
            raise KVTransferError(f"cannot connect to {ticket.decode_id}: {e}") from e
        # NCCL matches point-to-point ops by issue order, not by tag: one transfer at a time
        # per pair keeps both sides' order identical (gloo would not need it; same code).
        async with self._locks.setdefault("xfer/" + key, asyncio.Lock()):
            await self._send_one(ticket, header, payload, timeout, group, key)

    async def _send_one(self, ticket, header, payload, timeout, group, key) -> None:
        # Validate before any byte moves: an unmatched NCCL send would only end at NCCL's timeout.
        error = await asyncio.wait_for(ticket.decode_handle.check_header.remote(header.to_dict()), timeout)
        if error:
            raise KVTransferError(f"decode worker {ticket.decode_id} rejected KV: {error}")
        tag = abs(hash(ticket.ticket_id)) % (1 << 28)
        recv = ticket.decode_handle.recv_transfer.remote(key, header.to_dict(), tag, timeout)
        try:
            if faults.PLAN is not None:  # the receive is posted, no payload byte has moved yet
                await faults.ahit("transfer_half", header.sender_id, header.request_id)
            await asyncio.to_thread(send_tensors, group, wire_tensors(payload), tag, timeout)
        except Exception as e:
            self._drop(ticket, key)  # a broken group is never reused
            raise KVTransferError(f"send to {ticket.decode_id} failed: {e}") from e
        error = await asyncio.wait_for(recv, timeout)
        if error:
            raise KVTransferError(f"decode worker {ticket.decode_id} rejected KV: {error}")
