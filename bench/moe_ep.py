"""MoE expert parallelism on two GPUs (NCCL): dispatch / combine bandwidth and layer time.

Two processes (torch.multiprocessing, one per GPU) hold one `engine.moe.MoEBlock` each
(EP=2: half the experts per GPU; seeded random bf16 weights, shape of Qwen3-235B's MoE
layer by default: hidden 4096, 128 experts, top-8, expert width 1536). Each rank routes its
own T tokens (attention data-parallel). Rows, for T in 512 / 4096 / 16384 tokens per rank:

- p2p: both ranks `isend`/`irecv` the same number of bytes the dispatch moves across at
  that T, at the same time (both directions, as all-to-all does); GB/s per direction.
- a2a: a plain even `all_to_all_single` moving the same bytes across.
- dispatch: `MoEBlock._dispatch` (count exchange, host sync, gather + one uneven
  all-to-all of rows with their metadata); GB/s = bytes sent to the other GPU / time.
- combine: `MoEBlock._combine` (the reverse all-to-all) + the sum in token order.
- layer EP=2: the whole `MoEBlock.forward` (route, dispatch, grouped GEMM experts, combine)
  on both GPUs at once, 2T tokens in all; layer EP=1: one GPU holding all experts, T tokens.
  Speed-up = (2T / t_EP2) / (T / t_EP1).

Times are the median over iterations of the slower rank, each iteration fenced by a CUDA
sync and a barrier.

    python bench/moe_ep.py [--tokens 512,4096,16384] [--experts 128] [--iters 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JsonLines, format_table, progress  # noqa: E402

_DEVICE = "cuda"  # the ranks' device ("cpu" with --cpu)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="512,4096,16384", help="tokens per rank, comma-separated")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-width", type=int, default=1536, help="moe_intermediate_size")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the JSON lines to this file")
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU (gloo, fp32, no Triton)")
    return p.parse_args(argv)


def _cfg(a):
    from engine.config import ModelConfig

    return ModelConfig(arch="qwen3_moe", vocab_size=256, hidden_size=a.hidden, intermediate_size=0,
                       num_layers=1, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=a.experts,
                       num_experts_per_tok=a.top_k, moe_intermediate_size=a.expert_width, norm_topk_prob=True)


def _block(cfg, ep, device, dtype):
    """Seeded weights drawn per expert (the same on every rank), this rank's kept."""
    from engine.moe import MoEBlock

    with torch.device(device):
        block = MoEBlock(cfg, ep).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        block.gate.weight.normal_(0.0, cfg.hidden_size ** -0.5, generator=gen)
        for p in (block.w13, block.w2):
            for i, e in enumerate(block.local_experts):
                g = torch.Generator(device=device).manual_seed(1000 + e)
                p[i].normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    return block


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(fn, iters: int, collective: bool = True) -> float:
    """Median seconds of fn over iters, each fenced by sync + barrier; the slower rank's."""
    import torch.distributed as dist

    for _ in range(3):
        fn()
    runs = []
    for _ in range(iters):
        _sync()
        if collective:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync()
        runs.append(time.perf_counter() - t0)
    return _max(statistics.median(runs)) if collective else statistics.median(runs)


def _max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _p2p(nbytes: int, rank: int) -> callable:
    import torch.distributed as dist

    n = nbytes // 2
    send = torch.ones(n, dtype=torch.bfloat16, device=_DEVICE)
    recv = torch.empty_like(send)

    def run():
        ops = [dist.P2POp(dist.isend, send, 1 - rank), dist.P2POp(dist.irecv, recv, 1 - rank)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return run


def _a2a(rows: int, hidden: int) -> callable:
    import torch.distributed as dist

    send = torch.ones(2 * rows, hidden, dtype=torch.bfloat16, device=_DEVICE)
    recv = torch.empty_like(send)
    return lambda: dist.all_to_all_single(recv, send)


def _measure(a, rank: int, t: int, ep2, ep1, out: list) -> None:
    from engine.layers import TritonOps

    ops = None if a.cpu else TritonOps()
    gen = torch.Generator(device=_DEVICE).manual_seed(rank * 7919 + t)
    x = torch.randn(t, a.hidden, device=_DEVICE, generator=gen).to(ep2.gate.weight.dtype)
    with torch.no_grad():
        w, ids = ep2.route(x, ops)
        rank_of, token, meta, counts = ep2._plan(w, ids)
        recv_x, recv_meta, splits = ep2._dispatch(x, token, meta, counts)
        partial, _ = ep2._experts(recv_x, recv_meta, ops)
        row_bytes = a.hidden * x.element_size() + meta.shape[1] * 4
        # bytes each way between the GPUs (the larger direction): rows with their metadata,
        # and the combine's rows back
        cross = int(_max(splits[0][1 - rank] * row_bytes))
        cross_back = int(_max(splits[1][1 - rank] * a.hidden * x.element_size()))

        def combine():
            return ep2._combine(partial, splits, x, rank_of, token, ops)

        rec = dict(tokens=t, cross_bytes=cross, combine_bytes=cross_back, hidden=a.hidden,
                   experts=a.experts, top_k=a.top_k, expert_width=a.expert_width)
        rec["p2p_s"] = _time(_p2p(cross, rank), a.iters)
        rec["a2a_s"] = _time(_a2a(cross // row_bytes, row_bytes // 2), a.iters)
        rec["dispatch_s"] = _time(lambda: ep2._dispatch(x, token, meta, counts), a.iters)
        rec["combine_s"] = _time(combine, a.iters)
        rec["layer_ep2_s"] = _time(lambda: ep2(x, ops), a.iters)
        y2 = ep2(x, ops)
        if rank == 0:
            rec["layer_ep1_s"] = _time(lambda: ep1(x, ops), a.iters, collective=False)
            y1 = ep1(x, ops)
            rec["ep2_vs_ep1_rel_err"] = ((y1.float() - y2.float()).abs().max() / y1.float().abs().max()).item()
            rec["imbalance_rank0"] = ep2.expert_load()["imbalance"]
        torch.distributed.barrier()
        for key in ("p2p", "a2a", "dispatch"):
            rec[f"{key}_GBps"] = cross / rec[f"{key}_s"] / 1e9
        rec["combine_GBps"] = cross_back / rec["combine_s"] / 1e9
        out.append(rec)


def _rank_main(rank: int, a, result_path: str) -> None:
    import torch.distributed as dist

    from engine.moe import EPContext

    global _DEVICE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    if a.cpu:
        _DEVICE, dtype = "cpu", torch.float32
        dist.init_process_group("gloo", rank=rank, world_size=2)
    else:
        _DEVICE, dtype = "cuda", torch.bfloat16
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    records = []
    try:
        cfg = _cfg(a)
        ep2 = _block(cfg, EPContext.from_group(), _DEVICE, dtype)
        ep1 = _block(cfg, None, _DEVICE, dtype) if rank == 0 else None
        for t in [int(s) for s in a.tokens.split(",")]:
            try:
                _measure(a, rank, t, ep2, ep1, records)
            except Exception:  # keep the other sizes' figures
                traceback.print_exc()
                records.append(dict(tokens=t, error=traceback.format_exc(limit=3)))
                break
    finally:
        if rank == 0:
            torch.save(records, result_path)
        dist.destroy_process_group()


def _table(records: list[dict]) -> str:
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["tokens"], "error", *[None] * 9])
            continue
        ep1, ep2 = r.get("layer_ep1_s"), r["layer_ep2_s"]
        speed = (2 * r["tokens"] / ep2) / (r["tokens"] / ep1) if ep1 else None
        rows.append([r["tokens"], r["cross_bytes"] / 1e6, r["p2p_GBps"], r["a2a_GBps"],
                     r["dispatch_s"] * 1e3, r["dispatch_GBps"], r["combine_s"] * 1e3, r["combine_GBps"],
                     ep1 * 1e3 if ep1 else None, ep2 * 1e3, speed])
    heads = ["tokens/rank", "MB across", "p2p GB/s", "a2a GB/s", "dispatch ms", "dispatch GB/s",
             "combine ms", "combine GB/s", "EP=1 ms", "EP=2 ms", "EP=2 speed-up"]
    return format_table(heads, rows)


def main(argv=None) -> int:
    a = _args(argv)
    if torch.cuda.device_count() < 2 and not a.cpu:
        print("bench/moe_ep.py needs two CUDA GPUs", file=sys.stderr)
        return 2
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.pt")
        progress(f"2 ranks, tokens {a.tokens}, hidden {a.hidden}, {a.experts} experts, top-{a.top_k}")
        mp.spawn(_rank_main, args=(a, path), nprocs=2, join=True)
        records = torch.load(path, weights_only=False)
    sink = JsonLines(a.json)
    for r in records:
        r["device"] = "cpu (smoke test)" if a.cpu else torch.cuda.get_device_name(0)
        sink.emit({"bench": "moe_ep", **r})
    sink.close()
    print(_table(records))
    return 0 if records and "error" not in records[-1] else 1


if __name__ == "__main__":
    raise SystemExit(main())
