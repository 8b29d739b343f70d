"""The verify step: score k drafts + 1 in one target forward, accept, count.

A step with speculation holds verify sequences (q_len = k + 1: the last token and k
drafts, `ScheduledSeq.num_spec_tokens == k`) and may hold others (prefill chunks, plain
decodes). The target runs once over all of them; each verify sequence's k + 1 rows go
to the acceptance op (kernels/spec_verify.py on the triton backend, its torch reference
on CPU), the other sampled rows to the ordinary sampler. When every sequence verifies,
the forward is a graph captured per (batch bucket, k) on CUDA.

Drafts shorter than k are padded with filler tokens that the acceptance op never takes
(`draft_lens`), so the step's shape stays k + 1 per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import ScheduledBatch, StepOutput
from engine.sampling import SamplingBatch, sample
from engine.spec.drafters import Drafter, Proposal


@dataclass
class SpecMetrics:
    verify_steps: int = 0  # (sequence, step) pairs that verified drafts
    drafted_tokens: int = 0  # drafts proposed (padding not counted)
    accepted_tokens: int = 0  # drafts the target accepted
    emitted_tokens: int = 0  # tokens verify steps produced (accepted + one each)

    def as_dict(self) -> dict:
        steps = max(self.verify_steps, 1)
        return {
            "spec_verify_steps": self.verify_steps,
            "spec_drafted_tokens": self.drafted_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_acceptance_rate": self.accepted_tokens / max(self.drafted_tokens, 1),
            "spec_mean_accepted_length": self.accepted_tokens / steps,
            "spec_tokens_per_step": self.emitted_tokens / steps,
        }


@dataclass
class _Rows:
    """Where each sampled sequence's logits sit in the flat batch."""

    verify: list[int]  # sample index of each verify sequence
    verify_rows: list[int]  # [Bv * (k + 1)] flat rows
    plain: list[int]  # sample index of each other sampled sequence
    plain_rows: list[int]  # [Bp]


class SpecDecoder:
    def __init__(self, drafter: Drafter, k: int, device: torch.device, use_kernel: bool) -> None:
        if k < 1:
            raise ValueError(f"speculative tokens k must be >= 1, got {k}")
        self.drafter, self.k, self.device = drafter, k, torch.device(device)
        self.metrics = SpecMetrics()
        self.graphs = None  # VerifyGraphRunner (decode/graphs.py) for q_len = k + 1, CUDA only
        if use_kernel:
            from kernels.spec_verify import spec_verify as verify
        else:
            from kernels.spec_verify import spec_verify_reference as verify
        self._verify = verify

    def capture(self, model, cache, backend, max_batch_size: int, max_model_len: int) -> None:
        from decode.graphs import VerifyGraphRunner

        self.graphs = VerifyGraphRunner(model, cache, backend, max_batch_size, max_model_len, self.k + 1)
        self.graphs.capture()
        self.drafter.capture(max_batch_size, max_model_len)

    @staticmethod
    def _rows(batch: ScheduledBatch) -> _Rows:
        rows = _Rows([], [], [], [])
        flat = i = 0
        for seq in batch.seqs:
            flat += seq.num_new_tokens
            if not seq.sample:
                continue
            if seq.num_spec_tokens:
                rows.verify.append(i)
                rows.verify_rows.extend(range(flat - seq.num_spec_tokens - 1, flat))
            else:
                rows.plain.append(i)
                rows.plain_rows.append(flat - 1)
            i += 1
        return rows

    def _logits(self, runner, s, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (verify logits [Bv, k + 1, V], plain logits [Bp, V] or None)."""
        k1 = self.k + 1
        if self.graphs is not None and not rows.plain and len(rows.verify) == s.num_seqs:
            logits = self.graphs.run(s)  # [Bv * (k + 1), V]
            if logits is not None:
                return logits.view(-1, k1, logits.shape[-1]), None
        inp = runner.to_inputs(s)
        hidden = runner.forward(inp)  # [T, hidden]
        model = runner.model
        verify = model.compute_logits(hidden[runner._tensor(rows.verify_rows)], runner.backend)
        plain = (model.compute_logits(hidden[runner._tensor(rows.plain_rows)], runner.backend)
                 if rows.plain else None)
        return verify.view(-1, k1, verify.shape[-1]), plain

    def _randomness(self, runner, reqs, vocab: int):
        """uniform [B, k + 1] and Exp(1) noise [B, k + 1, V] from each request's generator."""
        k1, dev = self.k + 1, self.device
        u, noise = [], []
        for r in reqs:
            if r.params.greedy:  # unused by the op for greedy rows
                u.append(torch.zeros(k1, device=dev))
                noise.append(torch.ones(k1, vocab, device=dev))
                continue
            g = runner._generator(r)
            u.append(torch.rand(k1, device=dev, generator=g))
            noise.append(torch.empty(k1, vocab, device=dev).exponential_(generator=g))
        return torch.stack(u), torch.stack(noise)

    def _accept(self, runner, reqs, prop: Proposal, logits: torch.Tensor):
        """-> (tokens [Bv, k + 1] host list, accepted [Bv] host list, drafted [Bv])."""
        k, dev = self.k, self.device
        lens, drafts = [], []
        for r, toks in zip(reqs, prop.tokens):
            cap = min(k, r.params.max_tokens - len(r.output_token_ids) - 1)
            lens.append(min(len(toks), cap))
            drafts.append((toks + [0] * k)[:k])
        temps = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev)
        sampled = any(not r.params.greedy for r in reqs)
        u, noise = self._randomness(runner, reqs, logits.shape[-1]) if sampled else (None, None)
        out, _ = self._verify(
            logits.contiguous(),
            torch.tensor(drafts, dtype=torch.int64, device=dev),
            torch.tensor(lens, dtype=torch.int64, device=dev),
            temps,
            prop.probs.contiguous() if (sampled and prop.probs is not None) else None,
            u,
            noise,
        )
        rows = out.tolist()  # the one host sync of the acceptance: num = entries before the -1s, minus one
        return rows, [sum(t >= 0 for t in r) - 1 for r in rows], lens

    def execute(self, runner, batch: ScheduledBatch) -> StepOutput:
        """One target step with verification (runner: the target's engine.runner.ModelRunner)."""
        rows = self._rows(batch)
        sampled_seqs = [seq for seq in batch.seqs if seq.sample]
        reqs = [sampled_seqs[i].request for i in rows.verify]
        prop = self.drafter.propose(reqs, self.k)
        s = runner.collect(batch, {r.request_id: (t + [0] * self.k)[: self.k] for r, t in zip(reqs, prop.tokens)})
        verify_logits, plain_logits = self._logits(runner, s, rows)
        out, num, lens = self._accept(runner, reqs, prop, verify_logits)
        tokens: list[int] = [0] * len(sampled_seqs)
        spec: list[list[int]] = [[] for _ in sampled_seqs]
        logprobs = None
        for i, o, a in zip(rows.verify, out, num):
            spec[i], tokens[i] = o[:a], o[a]
        if plain_logits is not None:
            plain_reqs = [sampled_seqs[i].request for i in rows.plain]
            sb = SamplingBatch.build([r.params for r in plain_reqs],
                                     [runner._generator(r) for r in plain_reqs], self.device)
            t, lp = sample(plain_logits, sb)
            for i, tok in zip(rows.plain, t.tolist()):
                tokens[i] = tok
            if lp is not None:
                logprobs = [0.0] * len(sampled_seqs)
                for i, v in zip(rows.plain, lp.tolist()):
                    logprobs[i] = v
        m = self.metrics
        m.verify_steps += len(reqs)
        m.drafted_tokens += sum(lens)
        m.accepted_tokens += sum(num)
        m.emitted_tokens += sum(num) + len(reqs)
        return StepOutput(tokens, logprobs, spec)


def build_spec_decoder(config, target, runner, kv_dtype: torch.dtype, device, backend) -> SpecDecoder | None:
    """The engine's SpecDecoder from its EngineConfig (None when speculation is off)."""
    from engine.spec.draft_model import DraftModelDrafter, truncated_model
    from engine.spec.drafters import NgramDrafter

    if config.spec_drafter == "none":
        return None
    if config.spec_drafter == "ngram":
        drafter: Drafter = NgramDrafter(config.spec_ngram_max, config.spec_ngram_min)
    else:
        if config.spec_draft_model:
            from engine.loader.registry import load_model

            dtype = next(target.parameters()).dtype
            draft = load_model(config.spec_draft_model, dtype=dtype, device=device, quiet=True).model
            if torch.device(device).type == "cpu" and config.cpu_transposed_weights:
                from engine.layers import transpose_linears

                transpose_linears(draft, pack=config.cpu_packed_weights)  # as the target's (engine/llm.py)
            if draft.cfg.vocab_size != target.cfg.vocab_size:
                raise ValueError(
                    f"spec_draft_model: vocabulary {draft.cfg.vocab_size} differs from the target's "
                    f"{target.cfg.vocab_size}; a draft model must share the tokenizer"
                )
        else:
            n = config.spec_draft_layers or max(1, len(target.layers) // 4)
            draft = truncated_model(target, n)
        drafter = DraftModelDrafter(draft, runner.cache.spec.num_pages, kv_dtype, device, backend)
    return SpecDecoder(drafter, config.spec_k, device, use_kernel=backend.name == "triton")
