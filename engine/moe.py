"""Mixture-of-experts layer with expert parallelism (EP) over all-to-all.

Every rank of an EP group holds the full router and a subset of the experts (an
`EPContext` says which). A step on one rank:

  route     logits = x W_r^T -> softmax -> top-k (Mixtral always renormalizes the k
            weights; Qwen3-MoE when `norm_topk_prob`)
  dispatch  each token goes ONCE to every rank that owns at least one of its k experts,
            with its k (local expert id, weight) pairs (-1 / 0 for slots owned elsewhere):
            a count exchange, then uneven `all_to_all_single`s of rows and metadata
  experts   the received (row, expert) pairs sorted by local expert and run as one
            grouped GEMM (`torch._grouped_mm` on CUDA, a loop over experts elsewhere);
            each row's weighted expert outputs are summed on the expert side
  combine   the reverse all-to-all sends one partial sum per (token, rank) back, and the
            sender adds them up in its original token order
On CUDA under the Triton ops, routing and both sums are kernels/moe.py kernels (the sums
gather their <= k inputs per output row: no atomic adds of bf16 rows).

Sending a token once per rank rather than once per (token, expert) moves k/ranks-touched
times fewer bytes (top-8 over 2 ranks: ~4x). EP=1 runs the same code with the collectives
skipped. A rank with no tokens still takes part in every collective (`idle`), which is
how a rank without requests keeps lockstep with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import TORCH_OPS


@dataclass(frozen=True)
class EPContext:
    """Where this rank sits in its expert-parallel group.

    group: a `torch.distributed` process group (None when size == 1).
    placement: expert -> owning rank, one entry per expert; None = contiguous blocks
    (rank r owns experts [r*E/size, (r+1)*E/size)).
    """

    group: object | None = None
    rank: int = 0
    size: int = 1
    placement: tuple[int, ...] | None = None

    @classmethod
    def from_group(cls, group=None, placement=None) -> EPContext:
        """The context of the calling process in `group` (default: the world group)."""
        import torch.distributed as dist

        size = dist.get_world_size(group)
        return cls(group, dist.get_rank(group), size, tuple(placement) if placement is not None else None)

    def owners(self, num_experts: int) -> tuple[int, ...]:
        """expert -> rank, validated."""
        if self.placement is None:
            return tuple(e * self.size // num_experts for e in range(num_experts))
        if len(self.placement) != num_experts:
            raise ValueError(f"ep placement: expected one rank per expert ({num_experts}), got {len(self.placement)}")
        bad = [r for r in self.placement if not 0 <= r < self.size]
        if bad:
            raise ValueError(f"ep placement: ranks must be in 0..{self.size - 1}, got {bad[0]}")
        return tuple(self.placement)


SINGLE_RANK = EPContext()
GROUPED_MM = hasattr(torch, "_grouped_mm")  # CUDA bf16 experts as one grouped GEMM (else a loop)


def load_balancing_loss(router_probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e f_e * P_e.

    router_probs [T, E] softmax probabilities, expert_idx [T, k] chosen experts.
    f_e: top-k assignments to expert e per token (sums to k, HF's convention);
    P_e: mean router probability of expert e. Uniform routing gives k; collapse gives more.
    """
    t = router_probs.shape[0]
    counts = torch.bincount(expert_idx.reshape(-1).long(), minlength=num_experts).float()  # [E]
    f = counts / t
    p = router_probs.float().mean(0)  # [E]
    return num_experts * (f * p).sum()


def imbalance(counts: torch.Tensor) -> float:
    """max/mean of per-expert token counts (1.0 = perfectly balanced; 0 when empty)."""
    mean = counts.float().mean().item()
    return counts.max().item() / mean if mean > 0 else 0.0


class MoEBlock(nn.Module):
    """Router + this rank's experts; x [T, hidden] -> [T, hidden]."""

    def __init__(self, cfg, ep: EPContext | None = None) -> None:
        super().__init__()
        self.ep = ep or SINGLE_RANK
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.hidden, self.inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.renormalize = cfg.arch == "mixtral" or cfg.norm_topk_prob
        self.owner = self.ep.owners(self.num_experts)
        self.local_experts = [e for e, r in enumerate(self.owner) if r == self.ep.rank]
        self.gate = nn.Linear(self.hidden, self.num_experts, bias=False)
        n = len(self.local_experts)
        self.w13 = nn.Parameter(torch.empty(n, 2 * self.inter, self.hidden))  # gate then up, per expert
        self.w2 = nn.Parameter(torch.empty(n, self.hidden, self.inter))
        self._tables: dict = {}
        self.reset_load()

    # ---- load visibility ----

    def reset_load(self) -> None:
        cpu = torch.device("cpu")  # never the meta device the model may be built on
        self.routed = torch.zeros(self.num_experts, dtype=torch.int64, device=cpu)  # this rank's tokens per expert
        self.served = torch.zeros(len(self.local_experts), dtype=torch.int64, device=cpu)  # local experts, all ranks
        self.last_routed = self.routed.clone()

    def expert_load(self) -> dict:
        """Counts since the last `reset_load` (one host sync)."""
        routed = self.routed.cpu()
        return {
            "routed": routed.tolist(),
            "last_step": self.last_routed.cpu().tolist(),
            "served": dict(zip(self.local_experts, self.served.cpu().tolist())),
            "imbalance": imbalance(routed),
        }

    def _record(self, ids: torch.Tensor, local_counts: torch.Tensor) -> None:
        step = torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts)
        self.last_routed = step
        self.routed = self.routed.to(step.device) + step
        self.served = self.served.to(local_counts.device) + local_counts

    # ---- the layer ----

    def _table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert -> owning rank, expert -> index among its owner's experts), cached per device."""
        if device not in self._tables:
            local = [0] * self.num_experts
            for r in range(self.ep.size):
                for i, e in enumerate(e for e, o in enumerate(self.owner) if o == r):
                    local[e] = i
            self._tables[device] = (torch.tensor(self.owner, device=device), torch.tensor(local, device=device))
        return self._tables[device]

    def route(self, x: torch.Tensor, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k] int64)."""
        logits = F.linear(x, self.gate.weight)  # [T, E]
        if _use_triton(ops, x):
            from kernels.moe import moe_route

            w, ids = moe_route(logits, self.top_k, self.renormalize)
            return w, ids.long()
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        weights, ids = self.route(x, ops)  # [T, k]
        rank, token, send_meta, send_counts = self._plan(weights, ids)
        recv_x, recv_meta, splits = self._dispatch(x, token, send_meta, send_counts, ops)
        partial, local_counts = self._experts(recv_x, recv_meta, ops)  # [M, hidden]
        self._record(ids, local_counts)
        return self._combine(partial, splits, x, rank, token, ops)

    def idle(self) -> None:
        """Take part in this layer's collectives with no tokens (keeps EP ranks in lockstep)."""
        p = self.gate.weight
        self.forward(p.new_empty(0, self.hidden))

    def _plan(self, weights, ids):
        """-> (destination rank [N] and token [N] of each row to send, its metadata [N, 2k],
        rows per destination rank [R]).

        Rows go rank-major, tokens ascending within a rank. Metadata: k local expert ids
        (-1 where the slot's expert is on another rank), then the k weights (0 there).
        """
        owner, local = self._table(ids.device)
        t, size = ids.shape[0], self.ep.size
        dest = owner[ids]  # [T, k]
        hit = torch.zeros(t, size, dtype=torch.bool, device=ids.device).scatter_(1, dest, True)  # [T, R]
        rank, token = hit.t().nonzero(as_tuple=True)  # [N]
        mine = dest[token] == rank[:, None]  # [N, k]
        lid = torch.where(mine, local[ids[token]], -1)
        w = torch.where(mine, weights[token], 0.0)
        meta = torch.cat([lid.float(), w.float()], dim=1)  # [N, 2k]; ids < 2^24 are exact in fp32
        return rank, token, meta, hit.sum(0)

    def _dispatch(self, x, token, meta, send_counts, ops=None):
        if self.ep.size == 1:
            return x, meta, None  # one row per token, in order: no gather needed
        import torch.distributed as dist

        g, h = self.ep.group, x.shape[1]
        recv_counts = torch.empty_like(send_counts)
        counted = dist.all_to_all_single(recv_counts, send_counts, group=g, async_op=True)
        packed = self._pack(x, token, meta, ops)  # while the counts travel
        counted.wait()
        both = torch.cat([send_counts, recv_counts]).tolist()  # the one host sync of the layer
        send, recv = both[: self.ep.size], both[self.ep.size:]
        got = packed.new_empty(sum(recv), packed.shape[1])
        dist.all_to_all_single(got, packed, recv, send, group=g)
        return got[:, :h], got[:, h:].contiguous().view(meta.dtype), (send, recv)

    @staticmethod
    def _pack(x, token, meta, ops=None) -> torch.Tensor:
        """The rows to send, [N, hidden + meta]: x[token] with each row's metadata bytes as
        extra columns, so rows and metadata travel in one collective instead of two."""
        mv = meta.view(x.dtype)
        if _use_triton(ops, x):
            from kernels.moe import moe_pack_rows

            return moe_pack_rows(x, token, mv)  # one pass
        return torch.cat([x.index_select(0, token), mv], dim=1)

    def _combine(self, partial, splits, x, rank, token, ops=None):
        """Partial sums [M, hidden] back to their ranks, then each token's summed -> [T, hidden]."""
        if splits is None:
            return partial  # one rank: one row per token, in order
        import torch.distributed as dist

        send, recv = splits
        back = partial.new_empty(sum(send), partial.shape[1])  # [N, hidden], one row per (token, rank)
        dist.all_to_all_single(back, partial, send, recv, group=self.ep.group)
        if _use_triton(ops, x):
            from kernels.moe import moe_gather_sum

            pos = torch.full((x.shape[0], self.ep.size), -1, dtype=torch.int32, device=x.device)
            pos[token, rank] = torch.arange(len(token), dtype=torch.int32, device=x.device)
            return moe_gather_sum(back, pos)
        return torch.zeros_like(x).index_add_(0, token, back)

    def _experts(self, rows: torch.Tensor, meta: torch.Tensor, ops=None):
        """rows [M, hidden] with meta [M, 2k] -> (sum of each row's weighted local experts [M, hidden],
        (row, expert) pairs per local expert [L])."""
        k, n_local = self.top_k, len(self.local_experts)
        lid = meta[:, :k].long()  # [M, k]
        row, slot = (lid >= 0).nonzero(as_tuple=True)  # [A]
        expert = lid[row, slot]
        order = torch.argsort(expert, stable=True)
        row, slot, expert = row[order], slot[order], expert[order]
        counts = torch.bincount(expert, minlength=n_local)  # [L]
        y = self._grouped_ffn(rows[row], counts, ops)  # [A, hidden]
        weights = meta[:, k:]  # [M, k]
        if _use_triton(ops, rows):  # each row reads its <= k outputs: no atomics
            from kernels.moe import moe_gather_sum

            pos = torch.full((rows.shape[0], k), -1, dtype=torch.int32, device=rows.device)
            pos[row, slot] = torch.arange(len(row), dtype=torch.int32, device=rows.device)
            return moe_gather_sum(y, pos, weights.contiguous()), counts
        y = y * weights[row, slot].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(rows).index_add_(0, row, y.to(rows.dtype)), counts

    def _grouped_ffn(self, h: torch.Tensor, counts: torch.Tensor, ops=None) -> torch.Tensor:
        """h [A, hidden] sorted by local expert, counts [L] -> SwiGLU expert outputs [A, hidden]."""
        silu_mul = (ops or TORCH_OPS).silu_and_mul
        if h.shape[0] == 0:
            return h.new_empty(0, self.hidden)
        if GROUPED_MM and h.is_cuda and h.dtype == torch.bfloat16:
            offs = counts.cumsum(0).to(torch.int32)  # [L] end of each expert's rows
            gu = torch._grouped_mm(h, self.w13.transpose(1, 2), offs=offs)  # [A, 2I]
            return torch._grouped_mm(silu_mul(gu), self.w2.transpose(1, 2), offs=offs)
        out = torch.empty_like(h)
        start = 0
        for i, n in enumerate(counts.tolist()):
            if n:
                seg = h[start:start + n]
                out[start:start + n] = F.linear(silu_mul(F.linear(seg, self.w13[i])), self.w2[i])
                start += n
        return out

    # ---- weights ----

    _HF_EXPERT = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}

    def hf_target(self, mod: str, kind: str, tensor: torch.Tensor):
        """Where one HF tensor of this layer goes: -> (destination view, source) or None to skip.

        `mod` is the name after `model.layers.N.`. Per-expert checkpoints
        (`mlp.experts.E.gate_proj`, Mixtral's `block_sparse_moe.experts.E.w1`) and
        transformers 5's stacked `experts.gate_up_proj` / `experts.down_proj` [E, ...] are
        both accepted; experts owned by other ranks are skipped.
        """
        parts = mod.split(".")
        if parts[-1] == "gate" and kind == "weight":
            return self.gate.weight, tensor
        if parts[-1] in ("gate_up_proj", "down_proj") and parts[-2] == "experts" and kind == "":
            return (self.w13 if parts[-1] == "gate_up_proj" else self.w2), self.expert_rows(tensor)
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-1] in self._HF_EXPERT and kind == "weight":
            e = int(parts[-2])
            if self.owner[e] != self.ep.rank:
                return None
            i, which = self.local_experts.index(e), self._HF_EXPERT[parts[-1]]
            if which == 2:
                return self.w2[i], tensor
            return self.w13[i].narrow(0, which * self.inter, self.inter), tensor
        raise KeyError(f"unexpected MoE weight {mod}.{kind}")

    def expert_rows(self, full: torch.Tensor) -> torch.Tensor:
        """A tensor with one entry per expert [E, ...] -> this rank's entries [L, ...]."""
        return full[self.local_experts]


def _use_triton(ops, x: torch.Tensor) -> bool:
    """The kernels/moe.py path: CUDA tensors under the Triton ops (the torch code elsewhere)."""
    return x.is_cuda and getattr(ops, "name", "torch") == "triton"

