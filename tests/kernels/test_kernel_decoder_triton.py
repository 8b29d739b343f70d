"""A tiny decoder end to end on the Triton backend (on CPU: through the interpreter).

Prefill of two sequences (one crossing a page), then decode steps, through ModelRunner:
the logits must match the torch backend, and the layers must take the fused rotary + KV
store kernel (one launch a layer instead of apply_rotary + store_kv), with the same
numbers as the unfused pair.
"""

import pytest
import torch

pytest.importorskip("triton")

import kernels.ops  # noqa: E402
from engine.attention import TritonAttention  # noqa: E402
from engine.backend import TORCH_BACKEND, select_backend  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from engine.loader.registry import dummy_model  # noqa: E402
from engine.page_pool import PagePool  # noqa: E402
from engine.request import Request, ScheduledBatch, ScheduledSeq  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.helpers import spy_gemvs  # noqa: E402

LAYERS = 2
CONFIGS = {  # GQA 2 with Llama's layout; GQA 3 with Qwen3's q/k norms before rotary
    "llama": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "qwen3": dict(arch="qwen3", num_heads=6, num_kv_heads=2, qk_norm=True),
}
PROMPTS = [[5, 9, 2, 33, 41, 7, 7, 12, 60, 3, 18, 22, 1, 9, 50, 44, 8, 27, 31], [11, 4, 63, 29, 6]]
DECODE_TOKENS = [[17, 2], [40, 8]]  # teacher-forced, one per sequence a step


def _model(name, device, head_dim=16):
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_layers=LAYERS,
        head_dim=head_dim,
        max_position=64,
        **CONFIGS[name],
    )
    return dummy_model(cfg, seed=0, device=device)


def _logits(model, backend, kv_dtype, device) -> list[torch.Tensor]:
    """Logits [T, V] of the prefill step, then of each decode step."""
    cfg = model.cfg
    cache = KVCache(KVCacheSpec(LAYERS, 8, cfg.num_kv_heads, cfg.head_dim, kv_dtype), device)
    runner, pool = ModelRunner(model, cache, device, backend), PagePool(8)
    reqs = [Request(list(p), SamplingParams()) for p in PROMPTS]

    def step(counts):
        for req, n in zip(reqs, counts):
            need = -(-(req.num_computed_tokens + n) // 16) - len(req.pages)
            req.pages.extend(pool.allocate(max(need, 0)))
        batch = ScheduledBatch([ScheduledSeq(r, n, True) for r, n in zip(reqs, counts)])
        logits = runner.logits(batch)
        for req, n in zip(reqs, counts):
            req.num_computed_tokens += n
        return logits

    out = [step([len(p) for p in PROMPTS])]
    for tokens in DECODE_TOKENS:
        for req, tok in zip(reqs, tokens):
            req.output_token_ids.append(tok)
        out.append(step([1] * len(reqs)))
    return out


@pytest.mark.parametrize("name,kv_dtype", [("llama", torch.float32), ("qwen3", torch.int8)])
def test_triton_decoder_fuses_rotary_into_kv_store(name, kv_dtype, device, monkeypatch):
    model = _model(name, device)
    backend = select_backend(device, "triton")
    assert backend.attn.fuses_rotary
    calls = []

    def fail(*args, **kwargs):
        raise AssertionError("the fused path must not launch apply_rotary / store_kv")

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused_op(*args, **kwargs)

    fused_op = kernels.ops.rotary_store_kv
    with monkeypatch.context() as m:  # the two-launch path, for comparison
        m.setattr(TritonAttention, "fuses_rotary", False)
        unfused = _logits(model, backend, kv_dtype, device)
    monkeypatch.setattr(kernels.ops, "apply_rotary", fail)
    monkeypatch.setattr(kernels.ops, "store_kv", fail)
    monkeypatch.setattr(kernels.ops, "rotary_store_kv", counted)
    fused = _logits(model, backend, kv_dtype, device)

    assert len(calls) == LAYERS * (1 + len(DECODE_TOKENS))  # one launch a layer a step
    for got, want in zip(fused, unfused):
        assert torch.equal(got, want)  # the same numbers as apply_rotary + store_kv
    reference = _logits(model, TORCH_BACKEND, kv_dtype, device)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kv_dtype", [("llama", torch.float32), ("qwen3", torch.int8)])
def test_triton_decoder_folds_the_decode_store_into_attention(name, kv_dtype, device, monkeypatch):
    """With FUSE_ROTARY_STORE (head dim 32: tiles in halves) each decode step's layer is one
    rotary_store_decode_attention launch; prefill keeps rotary_store_kv. Same logits as the
    two launches, and as the torch backend."""
    import kernels.decode_attention as da

    model = _model(name, device, head_dim=32)
    backend = select_backend(device, "triton")
    with monkeypatch.context() as m:  # the two launches, for comparison
        m.setattr(da, "FUSE_ROTARY_STORE", False)
        unfused = _logits(model, backend, kv_dtype, device)
    calls = {"store": 0, "fused": 0}

    def spy(key, fn):
        def call(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(da, "FUSE_ROTARY_STORE", True)
    monkeypatch.setattr(kernels.ops, "rotary_store_kv", spy("store", kernels.ops.rotary_store_kv))
    monkeypatch.setattr(kernels.ops, "rotary_store_decode_attention",
                        spy("fused", kernels.ops.rotary_store_decode_attention))
    fused = _logits(model, backend, kv_dtype, device)
    # the interpreter runs int8 in halves; a GPU runs int8 at 64-token partitions whole
    decode_store = "fused" if device == "cpu" or kv_dtype != torch.int8 else "store"
    want = {"store": LAYERS, "fused": 0}
    want[decode_store] += LAYERS * len(DECODE_TOKENS)
    assert calls == want
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    reference = _logits(model, TORCH_BACKEND, kv_dtype, device)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_backends_pdl_choice_wraps_every_forward(device, monkeypatch):
    """Backend.pdl reaches the kernels through kernels._triton.pdl_scope around each
    forward pass and each LM head (prefill and decode); the torch backend opens no scope."""
    import kernels._triton as kt

    seen = []
    real = kt.pdl_scope

    def spy(enabled):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(kt, "pdl_scope", spy)
    model = _model("llama", device)
    for pdl in (True, False, None):
        seen.clear()
        _logits(model, select_backend(device, "triton", pdl=pdl), torch.float32, device)
        assert seen == [pdl] * 2 * (1 + len(DECODE_TOKENS))
    seen.clear()
    _logits(model, TORCH_BACKEND, torch.float32, device)
    assert seen == []


@pytest.mark.parametrize("rows,norms", [(2, "row"), (2, "split"), (2, "split_after"), (2, "apart"),
                                        (1, "row")])
def test_triton_decoder_sends_few_row_linears_to_the_gemv(rows, norms, device, monkeypatch):
    """Backend.gemv_rows: steps of at most that many rows take kernels/gemv.py for every
    linear layer (the MLP's up projection with SiLU-and-mul fused) and the LM head; the
    24-token prefill keeps F.linear. Rows as narrow as this model's also take each layer's
    residual add + RMSNorm into the GEMV after it ("row": qkv from the second layer on,
    gate_up in every layer). Rows too wide for that (here NORM_MAX_K = 0 makes them so)
    split it ("split"): o and down add the residual in (gemv_add), qkv and gate_up
    normalize from their sums (gemv_rmsnorm_sums; "split_after": with the scale after
    their loops). Either way only layer 0's norm and the final one run as norm kernels;
    with SPLIT_NORM off as well ("apart") every norm does. Logits as the torch backend's in
    all cases."""
    import kernels.gemv as g

    calls, norm_rows = [], []
    spy_gemvs(monkeypatch, calls)
    for name in ("fused_add_rmsnorm", "rmsnorm"):  # TritonOps' norm kernels
        def counted(x, *args, _real=getattr(kernels.ops, name)):
            norm_rows.append(x.shape[0])
            return _real(x, *args)
        monkeypatch.setattr(kernels.ops, name, counted)
    if norms == "split_after":
        monkeypatch.setattr(g, "SPLIT_SCALE_AFTER", True)
        norms = "split"
    if norms != "row":
        monkeypatch.setattr(g, "NORM_MAX_K", 0)
    monkeypatch.setattr(g, "SPLIT_NORM", norms == "split")
    model = _model("llama", device)
    got = _logits(model, select_backend(device, "triton", gemv_rows=rows), torch.float32, device)
    p, row, sums = "gemv", "gemv_add_rmsnorm", "gemv_rmsnorm_sums"
    pre, post = {"row": (row, row), "split": (sums, sums), "apart": (p, p)}[norms]
    add = "gemv_add" if norms == "split" else p
    first = [(2, False, p), (2, False, add), (2, True, post), (2, False, add)]  # qkv, o, gate_up, down
    later = [(2, False, pre), (2, False, add), (2, True, post), (2, False, add)]
    per_step = first + later * (LAYERS - 1) + [(2, False, p)]  # + the LM head
    assert calls == (per_step * len(DECODE_TOKENS) if rows == 2 else [])  # 2-row decode steps
    # layer 0's norm and the final one, or each layer's two and the final one
    step_norms = 2 * LAYERS + 1 if norms == "apart" or rows == 1 else 2
    assert norm_rows.count(2) == step_norms * len(DECODE_TOKENS)
    reference = _logits(model, TORCH_BACKEND, torch.float32, device)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_decoder_hands_attention_the_o_weight_ahead(device, monkeypatch):
    """Each layer's decode attention runs inside kernels.prefetch.ahead(its o weight), so its
    reduce kernel may ask L2 for it (AHEAD_BYTES); the prefill's attention has no reduce
    kernel; nothing is ahead once the step is done; the logits are the torch backend's."""
    import kernels.decode_attention as da
    import kernels.prefetch as kp

    seen = []

    def plan(*args, _real=da.ahead_plan):
        seen.append(kp._AHEAD.get())
        return _real(*args)

    monkeypatch.setattr(da, "ahead_plan", plan)
    model = _model("llama", device)
    got = _logits(model, select_backend(device, "triton"), torch.float32, device)
    weights = [layer.attn.o.weight for layer in model.layers]
    assert len(seen) == LAYERS * len(DECODE_TOKENS)
    assert all(a is b for a, b in zip(seen, weights * len(DECODE_TOKENS)))
    assert kp._AHEAD.get() is None
    for a, b in zip(got, _logits(model, TORCH_BACKEND, torch.float32, device)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
