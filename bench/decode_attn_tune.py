"""Sweep the decode-attention kernel's launch parameters on a GPU (issue 4's int8 target).

For each KV dtype (int8 with per-token-per-head scales, bf16) and each (partition size,
BLOCK_N, num_warps, num_stages, register cap, head dim whole or in halves), time
`kernels.decode_attention` on one layer of the 8B shape and print achieved bandwidth
(K + V + scale bytes / time) against a device copy. Times are kernel times: calls
replayed from a CUDA graph, as the engine runs them (bench.gpu_decode.graph_ms; a single
eager call's time also counts its Python launch path). Every config's output is checked
against the torch reference in fp32 (the pages dequantized exactly).
Both are also run with pages laid out head-major ([2, P, Hkv, S, D] viewed as
[2, P, S, Hkv, D]): a kv head's rows of a page are then one contiguous run.

    python bench/decode_attn_tune.py --layouts 0 --stages 0   # b32 ctx8192, ~1.5 min on an H200
    python bench/decode_attn_tune.py --batch 8 --ctx 1024 --partitions 64,128
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels.decode_attention as da  # noqa: E402
from bench.common import attention_tune_parser, ints, write_json_rows  # noqa: E402
from bench.gpu_decode import copy_bandwidth, graph_ms  # noqa: E402


def make_cache(kv: str, batch: int, ctx: int, hkv: int, d: int, head_major: bool):
    """A [2, P, 16, Hkv, D] cache (and [2, P, 16, Hkv] scales); head_major: stored as
    [2, P, Hkv, 16, D] (each head's rows of a page contiguous) and viewed in that shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = batch * ctx // 16
    shape = (2, pages, hkv, 16, d) if head_major else (2, pages, 16, hkv, d)
    if kv == "int8":
        data = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda", generator=g)
        scales = torch.empty(shape[:4], device="cuda").uniform_(0.005, 0.02, generator=g)
    else:
        data = torch.randn(shape, dtype=torch.bfloat16, device="cuda", generator=g)
        scales = None
    if head_major:  # same shape as the cache's, other strides
        data = data.transpose(2, 3)
        scales = None if scales is None else scales.transpose(2, 3)
    tables = torch.randperm(pages, device="cuda", generator=g).view(batch, ctx // 16).to(torch.int32)
    return data, scales, tables


def main() -> int:
    ap = attention_tune_parser(__doc__, batch=32, length_flag="--ctx", length=8192, kv_heads=8)
    ap.add_argument("--partitions", default="256,512,1024")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--stages", default="0,2,3,4", help="0: Triton's default")
    ap.add_argument("--maxnreg", default="0", help="register cap per thread (0: none)")
    ap.add_argument("--layouts", default="0,1", help="0: [P, S, Hkv, D] pages, 1: head-major [P, Hkv, S, D]")
    ap.add_argument("--kv", default="int8,bf16")
    ap.add_argument("--split-d", default="0,1", help="1: the head dim in two halves (power-of-two D >= 32)")
    ap.add_argument("--fast-i8", default="0,1",
                    help="1: int8 pages through fp16 dots and the ALU conversion (ignored for bf16 pages)")
    ap.add_argument("--i8-qk", default="0,1",
                    help="1: int8 pages' scores from int8 dots, the query split in two int8 parts "
                         "(tiles in halves; ignored for bf16 pages)")
    ap.add_argument("--lazy", default="0", help="1: the running max moved only past a margin (tiles in halves)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_attn_tune.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = copy_bandwidth() / 1e9
    print(f"# {torch.cuda.get_device_name()}, copy {bw:.0f} GB/s (read + write); "
          f"b{a.batch} ctx{a.ctx} H{a.heads}/{a.kv_heads} D{a.head_dim}", flush=True)
    q = torch.randn(a.batch, a.heads, a.head_dim, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((a.batch,), a.ctx, dtype=torch.int32, device="cuda")
    rows = []
    for kv in a.kv.split(","):
        for head_major in [bool(x) for x in ints(a.layouts)]:
            data, scales, tables = make_cache(kv, a.batch, a.ctx, a.kv_heads, a.head_dim, head_major)
            nbytes = data.numel() * data.element_size() + (0 if scales is None else scales.numel() * 4)
            da.TUNING = None
            ref = da.decode_attention_reference(q.float(), data, scales, tables, lens)
            fast = ints(a.fast_i8) if kv == "int8" else [0]
            i8qk = ints(a.i8_qk) if kv == "int8" else [0]
            axes = (ints(a.partitions), ints(a.block_n), ints(a.warps), ints(a.stages),
                    ints(a.maxnreg), ints(a.split_d), fast, i8qk, ints(a.lazy))
            seen = set()  # configs as they run: options a tile cannot take are dropped
            for psize, bn, w, st, mr, sd, fi, iq, lz in itertools.product(*axes):
                if bn > psize or psize % bn:
                    continue
                da.TUNING = {"block_n": bn, "num_warps": w, "num_stages": st or None,
                             "maxnreg": mr, "split_d": bool(sd), "fast_i8": bool(fi), "i8_qk": bool(iq),
                             "lazy": bool(lz)}
                ran = da.launch_config(q, data, psize, kv == "int8")  # what runs
                fi, iq, lz = int(ran["fast_i8"]), int(ran["i8_qk"]), int(ran["lazy"])
                sd = int(ran["split_d"])
                if (psize, bn, w, st, mr, sd, fi, iq, lz) in seen:
                    continue
                seen.add((psize, bn, w, st, mr, sd, fi, iq, lz))
                try:
                    out = da.decode_attention(q, data, scales, tables, lens, partition_size=psize).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    ms = graph_ms(functools.partial(da.decode_attention, q, data, scales, tables, lens,
                                                    partition_size=psize))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
                    print(f"{kv} part{psize} bn{bn} w{w} s{st} r{mr} h{sd} f{fi} q{iq} z{lz}: "
                          f"{type(e).__name__}: {str(e)[:80]}", flush=True)
                    continue
                gbps = nbytes / (ms * 1e-3) / 1e9
                r = dict(kv=kv, head_major=head_major, partition=psize, block_n=bn, warps=w,
                         stages=st, maxnreg=mr, split_d=bool(sd), fast_i8=bool(fi), i8_qk=bool(iq), lazy=bool(lz), ms=ms, gbps=gbps, frac=gbps * 1e9 / (bw * 1e9), rel_err=err)
                rows.append(r)
                print(f"{kv:4s} {'hm' if head_major else '  '} part{psize:5d} bn{bn:4d} w{w} s{st} r{mr} h{sd} f{fi} q{iq} z{lz}: "
                      f"{ms:7.4f} ms {gbps:7.0f} GB/s {r['frac']:5.0%}  err {err:.1e}", flush=True)
            del data, scales, tables
            torch.cuda.empty_cache()
    da.TUNING = None
    print("\n# best per dtype/layout")
    for key in sorted({(r["kv"], r["head_major"]) for r in rows}):
        best = min((r for r in rows if (r["kv"], r["head_major"]) == key and r["rel_err"] < 1e-2),
                   key=lambda r: r["ms"], default=None)
        if best:
            print(json.dumps(best))
    write_json_rows(a.json_out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
