"""Sweep the prefill-attention kernel's launch parameters on a GPU (issue 4's prefill target).

Causal self-attention of B sequences of S tokens (their K/V in random pages), bf16: for
each (BLOCK_M, BLOCK_N, num_warps, num_stages, split, heavy_first) time
`kernels.prefill_attention` and print TFLOP/s beside torch SDPA's flash and cuDNN
backends on the same sizes. `split` runs the key tiles left of the diagonal without the
causal mask; `heavy_first` launches the longest query blocks first. Every config's output
is checked against the default config's before it is timed.

    python bench/prefill_attn_tune.py                         # B4 S4096 H32 D128, ~1-2 min
    python bench/prefill_attn_tune.py --block-m 128 --block-n 64 --warps 8 --stages 3
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels.prefill_attention as pa  # noqa: E402
from bench.common import attention_tune_parser, ints, write_json_rows  # noqa: E402
from bench.gpu_decode import event_ms  # noqa: E402


def sdpa_tflops(batch: int, seq: int, heads: int, d: int, flops: float) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs = torch.randn(batch, heads, seq, d, dtype=torch.bfloat16, device="cuda")
    ks, vs = torch.randn_like(qs), torch.randn_like(qs)
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = event_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), iters=10)
            out[name] = flops / (ms * 1e-3) / 1e12
        except Exception as exc:  # noqa: BLE001 - a backend missing on this build
            print(f"# sdpa {name} unavailable: {exc!r}", flush=True)
    return out


def main() -> int:
    ap = attention_tune_parser(__doc__, batch=4, length_flag="--seq", length=4096, kv_heads=32)
    ap.add_argument("--block-m", default="64,128")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--stages", default="0,3", help="0: Triton's default")
    ap.add_argument("--split", default="0,1")
    ap.add_argument("--heavy-first", default="1")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("prefill_attn_tune.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    b, s, h, hkv, d = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    flops = 2.0 * b * h * s * s * d  # causal: half of 4 * B * H * S^2 * D
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b * s, h, d, dtype=torch.bfloat16, device="cuda", generator=g)
    pages = b * s // 16
    data = torch.randn(2, pages, 16, hkv, d, dtype=torch.bfloat16, device="cuda", generator=g)
    tables = torch.randperm(pages, device="cuda", generator=g).view(b, -1).to(torch.int32)
    cu = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * s
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    base = sdpa_tflops(b, s, h, d, flops)
    print(f"# {torch.cuda.get_device_name()} B{b} S{s} H{h}/{hkv} D{d} causal bf16; sdpa "
          + " ".join(f"{k} {v:.0f}" for k, v in base.items()) + " TFLOP/s", flush=True)
    run = functools.partial(pa.prefill_attention, q, data, None, tables, cu, lens, s)
    pa.TUNING = None
    ref = run().float()
    rows = []
    axes = (ints(a.block_m), ints(a.block_n), ints(a.warps), ints(a.stages), ints(a.split),
            ints(a.heavy_first))
    for bm, bn, w, st, split, heavy in itertools.product(*axes):
        pa.TUNING = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st or None,
                         split=bool(split), heavy_first=bool(heavy))
        tag = f"bm{bm:4d} bn{bn:4d} w{w} s{st} split{split} heavy{heavy}"
        try:
            err = ((run().float() - ref).norm() / ref.norm()).item()
            ms = event_ms(run, iters=10)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            print(f"{tag}: {type(e).__name__}: {str(e)[:80]}", flush=True)
            continue
        tf = flops / (ms * 1e-3) / 1e12
        rows.append(dict(pa.TUNING, ms=ms, tflops=tf, rel_err=err))
        vs = f"{tf / base['flash']:.2f}x flash" if "flash" in base else ""
        print(f"{tag}: {ms:7.3f} ms {tf:6.0f} TFLOP/s {vs}  err {err:.1e}", flush=True)
    pa.TUNING = None
    best = min((r for r in rows if r["rel_err"] < 1e-2), key=lambda r: r["ms"], default=None)
    print("# best: " + json.dumps(best))
    write_json_rows(a.json_out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
