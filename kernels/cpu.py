"""C kernels for the CPU engine (`cpu.c`): block-quantized matmuls and the element-wise ops.

Packed weights (GGUF Q4_1 / Q8_0, kept as blocks):

The bundled SmolLM2 GGUF stores its layers in Q4_1 (5 bits a weight) and its embedding /
LM head in Q8_0 (8.5 bits). Dequantized to fp32 they are 538 MB that every batch-1 decode
step must stream; packed here, with fp32 scales (6 and 9 bits a weight), they are 112 MB. `pack()` finds that packed form back from the
fp32 weights (only when it reproduces every weight bit for bit, so nothing about the model
changes), and `PackedWeight.matmul` computes `x @ W^T` from it with the C kernel in
`cpu.c`, built at first use with the machine's C compiler (`cc`) into
`~/.cache/miniinfer` (`MINIINFER_CACHE`). No compiler, a failed build, or
`MINIINFER_CPU_KERNELS=0`: `available()` is False and callers keep the dense fp32 path.

Element-wise ops (`rmsnorm`, `rotary_`, `silu_and_mul`): one call each instead of a chain
of small torch ops, for fp32 contiguous CPU tensors (`engine.layers.CPUOps` checks and
falls back to the torch reference otherwise).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BLOCK = 32
_SOURCE = Path(__file__).with_name("cpu.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_LIBS = ["-lm"]
_lock = threading.Lock()
_libs: dict[bool, ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _private(path: Path) -> bool:
    """Ours and writable by us alone: nobody else can plant a library we would load."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(path, os.W_OK)


def _cache_dir() -> Path:
    """$MINIINFER_CACHE, else ~/.cache/miniinfer, else a private folder in the temp dir
    (read-only home); a folder someone else owns or can write is never used."""
    for d in (os.environ.get("MINIINFER_CACHE"), "~/.cache/miniinfer",
              os.path.join(tempfile.gettempdir(), f"miniinfer-{os.getuid()}")):
        if d:
            path = Path(d).expanduser()
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError:
                continue
            if _private(path):
                return path
    return Path(tempfile.mkdtemp(prefix="miniinfer-"))  # this process only: compiled again


def _build(scalar: bool) -> Path:
    """Compile cpu.c (once per source, flags, compiler and CPU) -> the .so path."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    flags = _FLAGS + (["-DMINIINFER_SCALAR"] if scalar else [])
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), " ".join(flags).encode(), cc.encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    cache = _cache_dir()
    out = cache / f"miniinfer_cpu-{key}.so"
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # then an atomic rename: workers race
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp, *_LIBS], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {_SOURCE.name}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(scalar: bool = False) -> ctypes.CDLL | None:
    with _lock:
        if scalar not in _libs:
            _libs[scalar] = None
            if os.environ.get("MINIINFER_CPU_KERNELS", "1") != "0":
                try:
                    lib = ctypes.CDLL(str(_build(scalar)))
                    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                    lib.miniinfer_q4_1_gemm.argtypes = [p, i64, i64, p, p, p, i64, p, i32]
                    lib.miniinfer_q8_0_gemm.argtypes = [p, i64, i64, p, p, i64, p, i32]
                    f32 = ctypes.c_float
                    lib.miniinfer_rmsnorm.argtypes = [p, p, p, p, p, i64, i64, f32, i32]
                    lib.miniinfer_rotary.argtypes = [p, i64, i64, p, i64, i64, i64, i64, p, p, p]
                    lib.miniinfer_silu_mul.argtypes = [p, p, i64, i64, i32]
                    lib.miniinfer_decode_attention.argtypes = [p, p, p, i32, p, i64, p, i64, i64, i64, i64,
                                                               i64, f32, p, i64, p, i32]
                    for fn in ("q4_1_gemm", "q8_0_gemm", "rmsnorm", "rotary", "silu_mul", "decode_attention"):
                        getattr(lib, f"miniinfer_{fn}").restype = None
                    _libs[scalar] = lib
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    log.warning("CPU kernels off (the torch reference runs instead): %s", e)
        return _libs[scalar]


def available() -> bool:
    """True when the kernel is built and loaded (compiles on the first call)."""
    return _load() is not None


def simd() -> bool:
    """True when the loaded kernel uses AVX2 + FMA (else its portable C loops)."""
    lib = _load()
    return bool(lib is not None and lib.miniinfer_cpu_simd())


@dataclass
class PackedWeight:
    """W [N, K] as blocks of 32 along K: q4_1 (w = d*q + m) or q8_0 (w = d*q)."""

    kind: str  # "q4_1" | "q8_0"
    qs: torch.Tensor  # q4_1: uint8 [N, K/2] (two nibbles a byte); q8_0: int8 [N, K]
    d: torch.Tensor  # fp32 [N, K/32]
    m: torch.Tensor | None  # fp32 [N, K/32] (q4_1 only)
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """-> fp32 [N, K], the same rounding as the kernel (and as gguf's dequantizer)."""
        q = _unpack_nibbles(self.qs) if self.kind == "q4_1" else self.qs
        q = q.reshape(self.n, -1, BLOCK).float()
        w = self.d.unsqueeze(-1) * q
        if self.m is not None:
            w = w + self.m.unsqueeze(-1)
        return w.reshape(self.n, self.k)

    def matmul(self, x: torch.Tensor, scalar: bool = False) -> torch.Tensor:
        """x [..., K] fp32 -> x @ W^T [..., N] fp32. scalar: the portable build (tests)."""
        lib = _load(scalar)
        if lib is None:
            raise RuntimeError("the CPU kernels are not available (see kernels/cpu.py)")
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.k:
            raise ValueError(f"expected fp32 CPU input [..., {self.k}], got {x.dtype} {tuple(x.shape)} on {x.device}")
        x2 = x.reshape(-1, self.k).contiguous()
        y = torch.empty(x2.shape[0], self.n, dtype=torch.float32)
        threads = torch.get_num_threads()
        if self.kind == "q4_1":
            lib.miniinfer_q4_1_gemm(x2.data_ptr(), x2.shape[0], self.k, self.qs.data_ptr(), self.d.data_ptr(),
                                    self.m.data_ptr(), self.n, y.data_ptr(), threads)
        else:
            lib.miniinfer_q8_0_gemm(x2.data_ptr(), x2.shape[0], self.k, self.qs.data_ptr(), self.d.data_ptr(),
                                    self.n, y.data_ptr(), threads)
        return y.reshape(*x.shape[:-1], self.n)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K]: per 16-byte block, low nibbles then high nibbles."""
    b = qs.reshape(qs.shape[0], -1, BLOCK // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(qs.shape[0], -1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    b = q.reshape(q.shape[0], -1, BLOCK).to(torch.uint8)
    return (b[..., : BLOCK // 2] | (b[..., BLOCK // 2 :] << 4)).reshape(q.shape[0], -1).contiguous()


def _try_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    d = blocks.abs().amax(-1) / 127  # the largest |w| is d*127 exactly, so this is d
    q = (blocks / torch.where(d > 0, d, 1.0)[:, None]).round()
    if q.abs().amax() > 127 or not torch.equal(d[:, None] * q, blocks):
        return None
    return q.to(torch.int8), d


def _fit_q4_1(blocks: torch.Tensor, m: torch.Tensor, d: torch.Tensor):
    """-> (q, ok): the nibbles for step d, and which blocks (d*q) + m rebuilds exactly."""
    q = ((blocks - m[:, None]) / torch.where(d > 0, d, 1.0)[:, None]).round_().clamp_(0, 15)
    return q, ((d[:, None] * q + m[:, None]) == blocks).all(-1)


def _try_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    m = blocks.amin(-1)  # the q = 0 weight is m exactly; every other one is >= m
    span = blocks.amax(-1) - m
    # d is an fp16 value (GGUF stores it so) near span/15: that first, then (for the few
    # blocks it misses) its fp16 neighbours and span/14
    base = (span / 15).half()
    d = base.float()
    q, ok = _fit_q4_1(blocks, m, d)
    for cand in [(base.view(torch.int16) + s).view(torch.float16) for s in (1, -1, 2, -2)] + [
        (span / 14).half()
    ]:
        idx = (~ok).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        qc, okc = _fit_q4_1(blocks[idx], m[idx], cand[idx].float())
        good = idx[okc]
        q[good], d[good], ok[good] = qc[okc], cand[good].float(), True
    if not ok.all():
        return None
    return q, d, m


def pack(w: torch.Tensor) -> PackedWeight | None:
    """fp32 W [N, K] -> its Q8_0 or Q4_1 blocks when they rebuild every weight bit for bit
    (weights that came from such a GGUF do); None otherwise (K % 32 != 0, other weights)."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or w.device.type != "cpu":
        return None
    n, k = w.shape
    blocks = w.detach().reshape(-1, BLOCK)  # NaN never compares equal: such weights stay dense
    sample = blocks[:256]  # reject a format on a sample before paying for the whole tensor
    q8 = _try_q8_0(blocks) if _try_q8_0(sample) is not None else None
    if q8 is not None:
        q, d = q8
        return PackedWeight("q8_0", q.reshape(n, k).contiguous(), d.reshape(n, -1).contiguous(), None, n, k)
    q4 = _try_q4_1(blocks) if _try_q4_1(sample) is not None else None
    if q4 is not None:
        q, d, m = q4
        return PackedWeight("q4_1", _pack_nibbles(q.reshape(n, k)), d.reshape(n, -1).contiguous(),
                            m.reshape(n, -1).contiguous(), n, k)
    return None


# ---- element-wise ops (fp32, contiguous rows; callers check `fits`) ----


def fits(*tensors: torch.Tensor) -> bool:
    """True when the kernels here take these tensors: fp32, on the CPU, contiguous."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [..., N] -> (w * rmsnorm(r), r) with r = x (+ residual); r is x itself without one."""
    lib = _load()
    n = x.shape[-1]
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    lib.miniinfer_rmsnorm(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                          res_out.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n,
                          eps, torch.get_num_threads())
    return out, res_out


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
    """Neox rotary in place: q [T, H, D], k [T, Hkv, D] (heads contiguous, rows strided, e.g.
    views of the fused qkv output); cos/sin [P, D]; positions [T] int64."""
    lib = _load()
    t, h, d = q.shape
    lib.miniinfer_rotary(q.data_ptr(), q.stride(0), h, k.data_ptr(), k.stride(0), k.shape[1], t, d,
                         cos.data_ptr(), sin.data_ptr(), positions.data_ptr())


def rotary_fits(positions, q, k, cos, sin) -> bool:
    """Shapes, strides and dtypes only; `CPUOps` also checks the positions' range."""
    return (
        fits(cos, sin)
        and all(x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 3 and x.stride(2) == 1
                and x.stride(1) == x.shape[2] for x in (q, k))
        and q.shape[2] == k.shape[2] == cos.shape[1] and q.shape[0] == k.shape[0] == positions.shape[0]
        and positions.dtype == torch.int64 and positions.is_contiguous()
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]."""
    lib = _load()
    i = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], i)
    lib.miniinfer_silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * i), i, torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None,
                     block_tables: torch.Tensor, ctx_lens: torch.Tensor, max_ctx: int) -> torch.Tensor:
    """q [B, H, D] fp32 over one cache layer `data` [2, P, 16, Hkv, D] (fp32, or int8 with
    `scales` [2, P, 16, Hkv]); block_tables [B, maxp] and ctx_lens [B] int64 -> [B, H, D].
    Softmax scale 1/sqrt(D). The caller has checked `decode_attention_fits` and that
    `decode_attention_bounds` gave max_ctx: the C code trusts every index."""
    lib = _load()
    b, h, d = q.shape
    _, pages, _, hkv, _ = data.shape
    out = torch.empty_like(q)
    scratch = torch.empty(b * h * max_ctx, dtype=torch.float32)
    lib.miniinfer_decode_attention(
        q.data_ptr(), data.data_ptr(), scales.data_ptr() if scales is not None else None,
        int(scales is not None), block_tables.data_ptr(), block_tables.shape[1], ctx_lens.data_ptr(),
        b, h, hkv, d, pages, 1.0 / d**0.5, scratch.data_ptr(), max_ctx, out.data_ptr(),
        torch.get_num_threads())
    return out


def decode_attention_fits(q, data, scales, block_tables, ctx_lens) -> bool:
    """True when `decode_attention` takes these shapes and dtypes (CPU, contiguous, fp32 q,
    a [2, P, 16, Hkv, D] fp32 or int8 cache); reads no values."""
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in (q, data, block_tables, ctx_lens)):
        return False
    if q.dtype != torch.float32 or q.dim() != 3 or data.dim() != 5:
        return False
    b, h, d = q.shape
    if not (d <= 1024 and data.shape[0] == 2 and data.shape[2] == 16 and data.shape[4] == d
            and h % data.shape[3] == 0):
        return False
    if block_tables.dtype != torch.int64 or ctx_lens.dtype != torch.int64:
        return False
    if block_tables.dim() != 2 or block_tables.shape[0] != b or tuple(ctx_lens.shape) != (b,):
        return False
    if data.dtype == torch.float32:
        return True
    return (data.dtype == torch.int8 and scales is not None and fits(scales)
            and tuple(scales.shape) == tuple(data.shape[:4]))


def decode_attention_bounds(block_tables: torch.Tensor, ctx_lens: torch.Tensor, num_pages: int) -> int | None:
    """-> the longest context when every length is in 1..table width x 16 and every page id
    in the table is a page of the cache; None otherwise (then the torch path runs)."""
    if block_tables.numel() == 0 or ctx_lens.numel() == 0:
        return None
    lo, hi = int(ctx_lens.min()), int(ctx_lens.max())
    if lo < 1 or hi > block_tables.shape[1] * 16:
        return None
    if int(block_tables.min()) < 0 or int(block_tables.max()) >= num_pages:
        return None
    return hi
