"""A transfer the decode worker refuses after the sender's pre-check passed (its ticket
expired in between) is drained, so the sender's send completes at once instead of waiting
for the pairwise group's timeout (with NCCL that wait ends in the watchdog killing the
process). One DecodeWorker in this process, no Ray; gloo, like the CPU cluster."""

from __future__ import annotations

import asyncio
import time

import torch

from decode.worker import DecodeWorker
from kvtransfer.layout import export_pages, make_header
from kvtransfer.torch_transport import (
    SENDER,
    connect_store,
    make_pair_group,
    send_tensors,
    wire_tensors,
)
from kvtransfer.worker_spec import WorkerSpec

GROUP_TIMEOUT_S = 20.0


def test_refused_transfer_is_drained_and_the_sender_is_not_left_waiting():
    w = DecodeWorker("dtest", WorkerSpec(num_pages=64, transport="gloo", torch_threads=1, kv_dtype="int8"))

    async def main():
        await w.start()
        try:
            key = "ptest/dtest/0/0"
            opener = asyncio.create_task(w.open_pair(key))  # the receiver's side of the pair
            store = await asyncio.to_thread(connect_store, w.store_address, GROUP_TIMEOUT_S)
            group = await asyncio.to_thread(make_pair_group, store, key, SENDER, torch.device("cpu"),
                                            GROUP_TIMEOUT_S)
            await asyncio.wait_for(opener, GROUP_TIMEOUT_S)
            # the cache's own shape, for a ticket this worker does not (or no longer) hold
            payload = export_pages(w.engine.cache, list(range(5)), 70)
            header = make_header(w.engine.cache, payload, "req-1", "expired-ticket", 70, first_token=7)
            recv = asyncio.create_task(w.recv_transfer(key, header.to_dict(), 11, GROUP_TIMEOUT_S))
            t0 = time.monotonic()
            await asyncio.to_thread(send_tensors, group, wire_tensors(payload), 11, GROUP_TIMEOUT_S)
            sent_s = time.monotonic() - t0
            error = await asyncio.wait_for(recv, GROUP_TIMEOUT_S)
            free = await asyncio.wrap_future(w.loop.submit(lambda: w.engine.pool.num_free))
            return error, sent_s, free
        finally:
            await w.stop()

    error, sent_s, free = asyncio.run(main())
    assert "unknown or expired ticket" in error
    assert sent_s < GROUP_TIMEOUT_S / 4, f"the send waited {sent_s:.1f}s for a receive"
    assert free == 64  # nothing was reserved or committed
