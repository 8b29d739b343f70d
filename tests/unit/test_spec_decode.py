"""Speculative decoding (engine/spec/): lossless greedy, exact sampling, KV rollback.

- Greedy output with speculation equals greedy output without it, on SmolLM2, for the
  n-gram and the draft-model drafter (and the runs did verify and accept drafts).
- Temperature 1: over many seeded requests of a tiny random model, the empirical
  distribution of each generated position matches the target's exact marginal
  (chi-square goodness of fit, significance level 0.001 per position).
- Rollback: a drafter that proposes only rejected tokens still yields one token per
  step, the same tokens as without speculation; pages track the valid K/V exactly after
  every step and the pool ends full.
"""

from __future__ import annotations

import pytest
import torch

from bench.shapes import smollm2_135m
from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, dummy_model
from engine.page_pool import pages_needed
from engine.request import Request, ScheduledBatch, ScheduledSeq
from engine.sampling import SamplingParams
from engine.spec import Drafter, NgramDrafter, Proposal

SIGNIFICANCE = 0.001
GREEDY_TOKENS = 10


def _code_prompts(tok) -> list[list[int]]:
    return [
        tok.encode("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"),
        tok.encode("The capital of France is Paris. The capital of Spain is Madrid. The capital of"),
    ]


@pytest.fixture(scope="module")
def greedy_baseline(smollm2):
    prompts = _code_prompts(smollm2.tokenizer)
    engine = LLMEngine(smollm2, EngineConfig(num_pages=32))
    params = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
    return prompts, [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.parametrize(
    "spec", [dict(spec_drafter="ngram", spec_k=3), dict(spec_drafter="draft", spec_k=2, spec_draft_layers=24)]
)
def test_greedy_identical_with_speculation(smollm2, greedy_baseline, spec):
    prompts, expected = greedy_baseline
    engine = LLMEngine(smollm2, EngineConfig(num_pages=32, **spec))
    params = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == expected
    stats = engine.spec_stats()
    assert stats["spec_verify_steps"] > 0 and stats["spec_accepted_tokens"] > 0, stats
    # fewer target steps than tokens: accepted drafts were emitted
    assert stats["spec_tokens_per_step"] > 1.0
    assert engine.pool.is_full()


# ---- a tiny random model for the distribution and rollback tests ----

TINY = ModelConfig.from_hf(
    {**smollm2_135m(), "vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128}
)


@pytest.fixture(scope="module")
def tiny():
    model = dummy_model(TINY, seed=5)
    with torch.no_grad():  # sharper logits than the default init: about half the drafts pass
        model.lm_head.weight.mul_(1.5)
    # thousands of tiny per-sequence matmuls: one thread, or a busy 2-core CI box spins 40x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LoadedModel(model, None, TINY, "tiny", 0.0)
    torch.set_num_threads(threads)


def _next_probs(engine: LLMEngine, seqs: list[list[int]]) -> torch.Tensor:
    """The target's next-token distribution after each sequence -> [len(seqs), V] float64."""
    reqs = [Request(list(s), SamplingParams()) for s in seqs]
    for r in reqs:
        r.pages = engine.pool.allocate(pages_needed(r.num_tokens))
    batch = ScheduledBatch([ScheduledSeq(r, r.num_tokens, True) for r in reqs])
    logits = engine.runner.logits(batch)  # [T, V]
    for r in reqs:
        engine.pool.free(r.pages)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    return torch.softmax(logits[ends].double(), dim=-1)


def _marginals(engine: LLMEngine, prompt: list[int], depth: int) -> list[torch.Tensor]:
    """Exact distribution of generated tokens 1..depth (enumerating every prefix)."""
    v = TINY.vocab_size
    prefixes, weights = [[]], torch.ones(1, dtype=torch.float64)
    out = []
    for _ in range(depth):
        probs = _next_probs(engine, [prompt + p for p in prefixes])  # [P, V]
        joint = weights[:, None] * probs  # [P, V]
        out.append(joint.sum(0))
        prefixes = [p + [t] for p in prefixes for t in range(v)]
        weights = joint.reshape(-1)
    return out


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value; cells expected below 5 are pooled into one."""
    n = counts.sum().item()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


@pytest.mark.parametrize("spec", [dict(spec_drafter="draft", spec_draft_layers=1), dict(spec_drafter="ngram")])
def test_sampling_distribution_matches_target(tiny, spec):
    prompt = [3, 7, 3, 7, 3, 7, 11]  # repeats, so the n-gram drafter proposes
    depth, n = 3, 4000
    cfg = EngineConfig(num_pages=1024, max_num_seqs=512, max_num_batched_tokens=8192, spec_k=3, **spec)
    engine = LLMEngine(tiny, cfg)
    exact = _marginals(engine, prompt, depth)
    params = [SamplingParams(max_tokens=depth, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    outs = engine.generate([prompt] * n, params)
    stats = engine.spec_stats()
    # both branches ran many times: drafts accepted, and rejected with a residual resample
    assert 0.1 < stats["spec_acceptance_rate"] < 0.9 and stats["spec_drafted_tokens"] > 1000, stats
    for pos in range(1, depth):  # token 0 is sampled by prefill; 1.. by verify steps
        counts = torch.bincount(torch.tensor([o.token_ids[pos] for o in outs]), minlength=TINY.vocab_size)
        p = _chi_square_p(counts, exact[pos])
        assert p > SIGNIFICANCE, f"position {pos}: chi-square p = {p:.2e}"
    assert engine.pool.is_full()


class GarbageDrafter(Drafter):
    """Proposes k copies of a token the target never picks greedily."""

    name = "garbage"

    def __init__(self, token: int) -> None:
        self.token = token

    def propose(self, requests, k):
        return Proposal([[self.token] * k for _ in requests])


def _greedy_and_unused(tiny, prompts, params) -> tuple[list[list[int]], int]:
    """Greedy outputs without speculation, and a token none of them contains."""
    plain = LLMEngine(tiny, EngineConfig(num_pages=16))
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    unused = sorted(set(range(TINY.vocab_size)) - {t for e in expected for t in e})
    assert unused, "every token occurs in the greedy output; pick another prompt"
    return expected, unused[0]


def test_all_rejected_drafts_still_progress_and_roll_back(tiny):
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected, garbage = _greedy_and_unused(tiny, prompts, params)
    engine = LLMEngine(tiny, EngineConfig(num_pages=16, spec_drafter="ngram", spec_k=4))
    engine.runner.spec.drafter = GarbageDrafter(garbage)
    ids = [engine.add_request(p, params) for p in prompts]
    got = {rid: [] for rid in ids}
    steps = 0
    while engine.has_unfinished() and steps < 200:
        outs = engine.step()
        steps += 1
        for o in outs:
            got[o.request_id].extend(o.new_token_ids)
            if steps > 1:  # verify steps: exactly one token despite 4 drafts
                assert len(o.new_token_ids) == 1
        for req in engine.scheduler.running:  # rollback kept exactly the valid K/V's pages
            assert len(req.pages) == pages_needed(req.num_computed_tokens)
    assert [got[r] for r in ids] == expected
    stats = engine.spec_stats()
    assert stats["spec_drafted_tokens"] > 0 and stats["spec_accepted_tokens"] == 0
    assert engine.pool.is_full()


def test_rollback_frees_pages_a_reservation_opened(tiny):
    """A verify reservation that crosses into a new page gives that page back on rejection."""
    prompt = list(range(1, 14))  # 13 tokens + 1 sampled = 14: 4 drafts reach into page 2
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    _, garbage = _greedy_and_unused(tiny, [prompt], params)
    engine = LLMEngine(tiny, EngineConfig(num_pages=8, spec_drafter="ngram", spec_k=4))
    engine.runner.spec.drafter = GarbageDrafter(garbage)
    engine.add_request(prompt, params)
    engine.step()  # prefill
    req = engine.scheduler.running[0]
    assert len(req.pages) == 1
    batch = engine.scheduler.schedule()
    assert batch.seqs[0].num_spec_tokens == 4 and len(req.pages) == 2  # reserved 14 + 4 tokens
    out = engine.runner.execute(batch)
    engine.scheduler.update(batch, out)
    assert out.spec_token_ids[0] == []
    assert req.num_computed_tokens == 14 and len(req.pages) == 1
    assert engine.pool.num_used == 1


def test_ngram_lookup_extends_the_period():
    d = NgramDrafter(max_n=2)
    assert d.lookup([5, 1, 2, 3, 1, 2], 4) == [3, 1, 2, 3]
    assert d.lookup([1, 2, 3, 4], 3) == []


def test_bad_spec_config_is_rejected():
    with pytest.raises(ValueError, match="spec_drafter"):
        EngineConfig(spec_drafter="eagle")
    with pytest.raises(ValueError, match="spec_k"):
        EngineConfig(spec_drafter="ngram", spec_k=0)
