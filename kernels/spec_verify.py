"""Speculative-decoding acceptance over a whole batch: greedy match or rejection sampling.

Row b drafted `draft_lens[b]` <= K tokens d_0.. and the target scored them plus one in one
forward: logits [B, K+1, V], row j being the target's next-token distribution p_j after
d_0..d_{j-1}. Row b keeps the longest prefix of drafts that passes, then one more token:
- temperature 0: d_j passes iff it is argmax p_j; the extra token is argmax p_a.
- temperature > 0: d_j passes with probability min(1, p_j(d_j) / q_j(d_j)) (q_j: the
  drafter's distribution, one-hot for deterministic drafters); at the first failure the
  extra token is drawn from normalize(max(0, p_a - q_a)); when all pass, from p_a itself.
  This makes every emitted token distributed exactly as the target's (Leviathan et al.).

Randomness is an input (uniform [B, K+1], exponential noise [B, K+1, V]) so the kernel
and the torch reference agree exactly and seeded requests replay. Sampling from a
non-negative vector r is the exponential race argmax_v r_v / E_v, as in engine.sampling.

Two launches: `_spec_rows_kernel` (grid B x (K+1)) decides every (row, position) in
parallel, `_spec_accept_kernel` (grid B) takes the leading run of passes. Shapes only set
the grid, so the op can sit inside a CUDA graph.
"""

import torch

from kernels._triton import check_launchable, device_guard, kernel_op, tl, triton


@triton.jit
def _spec_rows_kernel(
    logits_ptr,  # [B, K+1, V] float32
    drafts_ptr,  # [B, K] int64
    lens_ptr,  # [B] int64
    temp_ptr,  # [B] float32
    q_ptr,  # [B, K, V] float32 (HAS_Q)
    u_ptr,  # [B, K+1] float32 (SAMPLED)
    noise_ptr,  # [B, K+1, V] float32 (SAMPLED)
    passed_ptr,  # [B, K+1] int32 out
    token_ptr,  # [B, K+1] int64 out: the token emitted if the run stops here
    V,
    K: tl.constexpr,
    HAS_Q: tl.constexpr,
    SAMPLED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    dl = tl.load(lens_ptr + b)
    is_draft = j < dl
    d = tl.load(drafts_ptr + b * K + tl.minimum(j, K - 1))
    row = logits_ptr + (b * (K + 1) + j) * V
    cols = tl.arange(0, BLOCK_V)
    t = 0.0
    if SAMPLED:
        t = tl.load(temp_ptr + b)
    if t == 0.0:
        best = float("-inf")
        best_i = 0
        for start in range(0, V, BLOCK_V):
            x = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf"))
            m = tl.max(x, 0)
            i = tl.argmax(x, 0)
            best_i = tl.where(m > best, start + i, best_i)
            best = tl.maximum(best, m)
        tl.store(passed_ptr + b * (K + 1) + j, (is_draft & (best_i == d)).to(tl.int32))
        tl.store(token_ptr + b * (K + 1) + j, best_i.to(tl.int64))
    else:
        inv_t = 1.0 / t
        mx = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):  # online softmax: running max and sum
            x = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf")) * inv_t
            m_new = tl.maximum(mx, tl.max(x, 0))
            s = s * tl.exp(mx - m_new) + tl.sum(tl.exp(x - m_new), 0)
            mx = m_new
        q_row = q_ptr + (b * K + tl.minimum(j, K - 1)) * V
        n_row = noise_ptr + (b * (K + 1) + j) * V
        best = -1.0
        best_i = 0
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            p = tl.exp(tl.load(row + c, mask=mask, other=float("-inf")) * inv_t - mx) / s
            if HAS_Q:
                q = tl.where(is_draft, tl.load(q_row + c, mask=mask, other=0.0), 0.0)
            else:
                q = tl.where((c == d) & is_draft, 1.0, 0.0)
            r = tl.maximum(p - q, 0.0)
            e = tl.load(n_row + c, mask=mask, other=1.0)
            score = tl.where(mask, r / e, -1.0)
            m = tl.max(score, 0)
            i = tl.argmax(score, 0)
            best_i = tl.where(m > best, start + i, best_i)
            best = tl.maximum(best, m)
        p_d = tl.exp(tl.load(row + d) * inv_t - mx) / s
        q_d = 1.0
        if HAS_Q:
            q_d = tl.load(q_row + d)
        u = tl.load(u_ptr + b * (K + 1) + j)
        tl.store(passed_ptr + b * (K + 1) + j, (is_draft & (u * q_d < p_d)).to(tl.int32))
        tl.store(token_ptr + b * (K + 1) + j, best_i.to(tl.int64))


@triton.jit
def _spec_accept_kernel(
    drafts_ptr,  # [B, K] int64
    lens_ptr,  # [B] int64
    passed_ptr,  # [B, K+1] int32
    token_ptr,  # [B, K+1] int64
    out_ptr,  # [B, K+1] int64 out: accepted drafts, then the final token, then -1
    num_ptr,  # [B] int64 out: accepted drafts
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K)
    dl = tl.load(lens_ptr + b)
    ok = tl.load(passed_ptr + b * (K + 1) + j, mask=j < dl, other=0)
    a = tl.min(tl.where(ok == 0, j, BLOCK_K), 0)  # first failure
    a = tl.minimum(a, dl)
    drafts = tl.load(drafts_ptr + b * K + j, mask=j < K, other=-1)
    final = tl.load(token_ptr + b * (K + 1) + a)
    out = tl.where(j < a, drafts, tl.where(j == a, final, -1))
    tl.store(out_ptr + b * (K + 1) + j, out, mask=j < K + 1)
    tl.store(num_ptr + b, a.to(tl.int64))


@kernel_op("spec_verify")
def _spec_verify_op(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    temperature: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniform: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, k1, v = logits.shape
    k = k1 - 1
    out = torch.empty(b, k1, dtype=torch.int64, device=logits.device)
    num = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out, num
    passed = torch.empty(b, k1, dtype=torch.int32, device=logits.device)
    token = torch.empty(b, k1, dtype=torch.int64, device=logits.device)
    sampled = noise is not None
    with device_guard(logits):
        _spec_rows_kernel[(b, k1)](
            logits, draft_tokens, draft_lens, temperature,
            draft_probs if draft_probs is not None else logits,
            uniform if sampled else logits, noise if sampled else logits,
            passed, token, v,
            K=k, HAS_Q=draft_probs is not None, SAMPLED=sampled,
            BLOCK_V=min(4096, triton.next_power_of_2(v)), num_warps=8,
        )
        _spec_accept_kernel[(b,)](
            draft_tokens, draft_lens, passed, token, out, num,
            K=k, BLOCK_K=triton.next_power_of_2(k1), num_warps=1,
        )
    return out, num


@_spec_verify_op.register_fake
def _(logits, draft_tokens, draft_lens, temperature, draft_probs, uniform, noise):
    b, k1, _ = logits.shape
    return logits.new_empty(b, k1, dtype=torch.int64), logits.new_empty(b, dtype=torch.int64)


def _check(logits, draft_tokens, draft_lens, temperature, draft_probs, uniform, noise) -> None:
    name = "spec_verify"
    if logits.dim() != 3 or logits.shape[1] < 2:
        raise ValueError(f"{name}: logits must be [B, K+1, V] with K >= 1, got {tuple(logits.shape)}")
    b, k1, v = logits.shape
    want = {
        "logits": (logits, (b, k1, v), torch.float32),
        "draft_tokens": (draft_tokens, (b, k1 - 1), torch.int64),
        "draft_lens": (draft_lens, (b,), torch.int64),
        "temperature": (temperature, (b,), torch.float32),
        "draft_probs": (draft_probs, (b, k1 - 1, v), torch.float32),
        "uniform": (uniform, (b, k1), torch.float32),
        "noise": (noise, (b, k1, v), torch.float32),
    }
    for arg, (t, shape, dtype) in want.items():
        if t is None:
            continue
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(
                f"{name}: {arg} must be a contiguous {dtype} tensor of shape {shape}, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if (uniform is None) != (noise is None):
        raise ValueError(f"{name}: uniform and noise come together (both None = all rows greedy)")


def spec_verify(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    temperature: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [B, K+1] int64: accepted drafts, the final token, then -1; accepted [B]).

    logits [B, K+1, V] float32; draft_tokens [B, K] int64 (entries past draft_lens[b] are
    ignored); draft_lens [B] int64 in [0, K]; temperature [B] float32 (0 = greedy row);
    draft_probs [B, K, V] or None (one-hot drafts); uniform [B, K+1] in [0, 1) and noise
    [B, K+1, V] Exp(1), or both None when every row is greedy.
    """
    args = (logits, draft_tokens, draft_lens, temperature, draft_probs, uniform, noise)
    check_launchable("spec_verify", *(t for t in args if t is not None))
    _check(*args)
    return _spec_verify_op(*args)


def spec_verify_reference(logits, draft_tokens, draft_lens, temperature, draft_probs=None, uniform=None,
                          noise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`spec_verify`'s contract (same arguments) in plain torch: what CPU engines run."""
    _check(logits, draft_tokens, draft_lens, temperature, draft_probs, uniform, noise)
    b, k1, v = logits.shape
    k = k1 - 1
    pos = torch.arange(k1, device=logits.device)
    is_draft = pos[None, :] < draft_lens[:, None]  # [B, K+1]
    d = torch.cat([draft_tokens, draft_tokens[:, -1:]], dim=1)  # [B, K+1], last col unused
    greedy_tok = logits.argmax(dim=-1)  # [B, K+1]
    passed = is_draft & (greedy_tok == d)
    token = greedy_tok
    if noise is not None:
        t = temperature.clamp_min(1e-5)[:, None, None]
        p = torch.softmax(logits / t, dim=-1)  # [B, K+1, V]
        if draft_probs is None:
            q = torch.nn.functional.one_hot(d, v).float()
        else:
            q = torch.cat([draft_probs, draft_probs[:, -1:]], dim=1)
        q = q * is_draft[..., None]
        resid = (p - q).clamp_min(0.0)
        drawn = (resid / noise).argmax(dim=-1)
        p_d = p.gather(2, d[..., None]).squeeze(2)
        q_d = q.gather(2, d[..., None]).squeeze(2) if draft_probs is not None else torch.ones_like(p_d)
        ok = is_draft & (uniform * q_d < p_d)
        sampled = (temperature > 0)[:, None]
        passed = torch.where(sampled, ok, passed)
        token = torch.where(sampled, drawn, greedy_tok)
    fail = torch.where(~passed[:, :k], pos[None, :k], k)  # [B, K]
    a = torch.minimum(fail.min(dim=1).values, draft_lens)  # [B]
    final = token.gather(1, a[:, None])  # [B, 1]
    out = torch.where(pos[None, :] < a[:, None], d, torch.where(pos[None, :] == a[:, None], final, -1))
    return out, a
