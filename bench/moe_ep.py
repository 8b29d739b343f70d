"""MoE expert parallelism on two or four GPUs (NCCL): dispatch / combine bandwidth, layer time.

N processes (torch.multiprocessing, one per GPU; --ranks, default 2) hold one
`engine.moe.MoEBlock` each (EP=N: 1/N of the experts per GPU; seeded random bf16 weights,
shape of Qwen3-235B's MoE layer by default: hidden 4096, 128 experts, top-8, expert width
1536). Each rank routes its own T tokens (attention data-parallel). Rows, for T in 512 /
4096 / 16384 tokens per rank:

- p2p: every rank `isend`s / `irecv`s to and from each other rank, at the same time, the
  bytes the dispatch sends off the GPU at that T (split evenly over the peers); GB/s =
  bytes off one GPU / time.
- a2a: a plain `all_to_all_single` moving the same bytes off each GPU (nothing to itself).
- dispatch: `MoEBlock._dispatch` (count exchange, host sync, row packing + one uneven
  all-to-all of rows with their metadata); GB/s = bytes sent to other GPUs / time. The
  JSON lines also time its parts alone (count exchange, packing, the rows' all-to-all).
- combine: `MoEBlock._combine` (the reverse all-to-all) + the sum in token order.
- layer: the whole `MoEBlock.forward` (route, dispatch, grouped GEMM experts, combine),
  EP=N on all GPUs at once (N*T tokens in all); with N > 2 also EP=2 on GPUs 0-1; EP=1: one
  GPU holding all experts, T tokens. Speed-up of EP=n = (n*T / t_EPn) / (T / t_EP1).

Times are the median over iterations of the slowest rank, each iteration fenced by a CUDA
sync and a barrier.

    python bench/moe_ep.py [--ranks 2|4] [--tokens 512,4096,16384] [--experts 128] [--iters 20]
    python bench/moe_ep.py --cpu --ranks 4 --tokens 16 --hidden 64 --experts 8 --expert-width 32
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
    p.add_argument("--profile", default=None, help="write a profiler table of the dispatch at the "
                   "largest size to PREFIX.rankN.txt (and rank 0's trace to PREFIX.rank0.json)")
    p.add_argument("--ranks", type=int, default=2, help="EP size: processes, one GPU each (>= 2)")
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


def _p2p(nbytes: int, rank: int, size: int) -> callable:
    """Every rank sends nbytes in all, split evenly over its peers, and receives as much."""
    import torch.distributed as dist

    n = nbytes // 2 // (size - 1)
    peers = [r for r in range(size) if r != rank]
    send = [torch.ones(n, dtype=torch.bfloat16, device=_DEVICE) for _ in peers]
    recv = [torch.empty_like(t) for t in send]

    def run():
        ops = [dist.P2POp(dist.isend, t, r) for t, r in zip(send, peers)]
        ops += [dist.P2POp(dist.irecv, t, r) for t, r in zip(recv, peers)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return run


def _a2a(rows: int, hidden: int, rank: int, size: int) -> callable:
    """all_to_all_single moving rows (split evenly over the peers) off this rank, none to itself."""
    import torch.distributed as dist

    per = rows // (size - 1)
    splits = [0 if r == rank else per for r in range(size)]
    send = torch.ones(per * (size - 1), hidden, dtype=torch.bfloat16, device=_DEVICE)
    recv = torch.empty_like(send)
    return lambda: dist.all_to_all_single(recv, send, splits, splits)


def _measure(a, rank: int, t: int, blocks: dict, out: list) -> None:
    """blocks: EP size -> this rank's MoEBlock (None where the rank takes no part)."""
    from engine.layers import TritonOps

    n = a.ranks
    epn = blocks[n]
    ops = None if a.cpu else TritonOps()
    gen = torch.Generator(device=_DEVICE).manual_seed(rank * 7919 + t)
    x = torch.randn(t, a.hidden, device=_DEVICE, generator=gen).to(epn.gate.weight.dtype)
    with torch.no_grad():
        w, ids = epn.route(x, ops)
        rank_of, token, meta, counts = epn._plan(w, ids)
        recv_x, recv_meta, splits = epn._dispatch(x, token, meta, counts, ops)
        partial, _ = epn._experts(recv_x, recv_meta, ops)
        row_bytes = a.hidden * x.element_size() + meta.shape[1] * 4
        # bytes off each GPU (the busiest one's): rows with their metadata, and the combine's
        # rows back
        off = sum(c for r, c in enumerate(splits[0]) if r != rank)
        back = sum(c for r, c in enumerate(splits[1]) if r != rank)
        cross = int(_max(off * row_bytes))
        cross_back = int(_max(back * a.hidden * x.element_size()))

        def combine():
            return epn._combine(partial, splits, x, rank_of, token, ops)

        def layer(ep_size):
            block = blocks.get(ep_size)
            return (lambda: block(x, ops)) if block is not None else (lambda: None)

        rec = dict(tokens=t, ranks=n, cross_bytes=cross, combine_bytes=cross_back, hidden=a.hidden,
                   experts=a.experts, top_k=a.top_k, expert_width=a.expert_width)
        rec["p2p_s"] = _time(_p2p(cross, rank, n), a.iters)
        rec["a2a_s"] = _time(_a2a(cross // row_bytes, row_bytes // 2, rank, n), a.iters)
        rec["dispatch_s"] = _time(lambda: epn._dispatch(x, token, meta, counts, ops), a.iters)
        rec.update(_dispatch_parts(a, epn, x, token, meta, counts, splits, ops))
        if a.profile and t == max(int(v) for v in a.tokens.split(",")):
            _profile(a, rank, lambda: epn._dispatch(x, token, meta, counts, ops))
        rec["combine_s"] = _time(combine, a.iters)
        rec[f"layer_ep{n}_s"] = _time(layer(n), a.iters)
        if n > 2:  # EP=2 on GPUs 0-1; the others wait at each iteration's barrier
            rec["layer_ep2_s"] = _time(layer(2), a.iters)
        yn = epn(x, ops)
        if rank == 0:
            rec["layer_ep1_s"] = _time(layer(1), a.iters, collective=False)
            y1 = blocks[1](x, ops)
            rec["epn_vs_ep1_rel_err"] = ((y1.float() - yn.float()).abs().max() / y1.float().abs().max()).item()
            rec["imbalance_rank0"] = epn.expert_load()["imbalance"]
        torch.distributed.barrier()
        for key in ("p2p", "a2a", "dispatch"):
            rec[f"{key}_GBps"] = cross / rec[f"{key}_s"] / 1e9
        rec["combine_GBps"] = cross_back / rec["combine_s"] / 1e9
        out.append(rec)


def _dispatch_parts(a, block, x, token, meta, counts, splits, ops) -> dict:
    """The dispatch's pieces timed alone: the count exchange with its host sync, the row
    packing, and the rows' all-to-all with the real split sizes."""
    import torch.distributed as dist

    g = block.ep.group

    def count_exchange():
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=g)
        got.tolist()

    def pack():
        return block._pack(x, token, meta, ops)

    packed = pack()
    send, recv = splits
    got = packed.new_empty(sum(recv), packed.shape[1])
    return {"dispatch_count_exchange_s": _time(count_exchange, a.iters),
            "dispatch_pack_s": _time(pack, a.iters),
            "dispatch_rows_a2a_s": _time(lambda: dist.all_to_all_single(got, packed, recv, send, group=g),
                                         a.iters)}


def _profile(a, rank: int, fn) -> None:
    """A torch.profiler table of fn (5 calls) from each rank, to --profile's file + rank."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([] if a.cpu else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        for _ in range(5):
            fn()
        _sync()
    sort = "cpu_time_total" if a.cpu else "cuda_time_total"
    Path(f"{a.profile}.rank{rank}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=25))
    if rank == 0:
        prof.export_chrome_trace(f"{a.profile}.rank0.json")


def _rank_main(rank: int, a, result_path: str) -> None:
    import torch.distributed as dist

    from engine.moe import EPContext

    global _DEVICE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    if a.cpu:
        _DEVICE, dtype = "cpu", torch.float32
        dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    else:
        _DEVICE, dtype = "cuda", torch.bfloat16
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=a.ranks, device_id=torch.device("cuda", rank))
    records = []
    try:
        cfg = _cfg(a)
        blocks = {a.ranks: _block(cfg, EPContext.from_group(), _DEVICE, dtype)}
        if a.ranks > 2:
            pair = dist.new_group([0, 1])  # every rank takes part in creating it
            blocks[2] = _block(cfg, EPContext.from_group(pair), _DEVICE, dtype) if rank < 2 else None
        blocks[1] = _block(cfg, None, _DEVICE, dtype) if rank == 0 else None
        for t in [int(s) for s in a.tokens.split(",")]:
            try:
                _measure(a, rank, t, blocks, records)
            except Exception:  # keep the other sizes' figures
                traceback.print_exc()
                records.append(dict(tokens=t, error=traceback.format_exc(limit=3)))
                break
    finally:
        if rank == 0:
            torch.save(records, result_path)
        dist.destroy_process_group()


def _table(records: list[dict]) -> str:
    sizes = sorted({int(k[len("layer_ep"):-2]) for r in records for k in r if k.startswith("layer_ep")})
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["tokens"], "error", *[None] * (6 + 2 * len(sizes))])
            continue
        t1 = r.get("layer_ep1_s")
        times = [r.get(f"layer_ep{n}_s") for n in sizes]
        speed = [(n * r["tokens"] / tn) / (r["tokens"] / t1) if t1 and tn else None
                 for n, tn in zip(sizes, times) if n > 1]
        rows.append([r["tokens"], r["cross_bytes"] / 1e6, r["p2p_GBps"], r["a2a_GBps"],
                     r["dispatch_s"] * 1e3, r["dispatch_GBps"], r["combine_s"] * 1e3, r["combine_GBps"],
                     *[tn * 1e3 if tn else None for tn in times], *speed])
    heads = ["tokens/rank", "MB off GPU", "p2p GB/s", "a2a GB/s", "dispatch ms", "dispatch GB/s",
             "combine ms", "combine GB/s", *[f"EP={n} ms" for n in sizes],
             *[f"EP={n} speed-up" for n in sizes if n > 1]]
    return format_table(heads, rows)


def main(argv=None) -> int:
    a = _args(argv)
    if a.ranks < 2:
        print("bench/moe_ep.py: --ranks must be at least 2", file=sys.stderr)
        return 2
    if torch.cuda.device_count() < a.ranks and not a.cpu:
        print(f"bench/moe_ep.py: --ranks {a.ranks} needs {a.ranks} CUDA GPUs, "
              f"this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.pt")
        progress(f"{a.ranks} ranks, tokens {a.tokens}, hidden {a.hidden}, {a.experts} experts, top-{a.top_k}")
        mp.spawn(_rank_main, args=(a, path), nprocs=a.ranks, join=True)
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
