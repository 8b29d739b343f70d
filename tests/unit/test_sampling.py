import math

import pytest
import torch

from engine.errors import InvalidRequest
from engine.sampling import SamplingBatch, SamplingParams, sample


def _batch(params, seeds=None):
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in (seeds or [None] * len(params))]
    return SamplingBatch.build(params, gens, "cpu")


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    tokens, lp = sample(logits, _batch([SamplingParams()] * 4))
    assert tokens.tolist() == logits.argmax(-1).tolist() and lp is None


def test_logprobs_of_chosen_token():
    logits = torch.randn(2, 30)
    tokens, lp = sample(logits, _batch([SamplingParams(logprobs=True)] * 2))
    ref = torch.log_softmax(logits, -1)[torch.arange(2), tokens]
    assert torch.allclose(lp, ref)


def test_seeded_rows_independent_of_batch():
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=5)
    alone = [sample(logits[i : i + 1], _batch([p], [5]))[0].item() for i in range(3)]
    together = sample(logits, _batch([p] * 3, [5, 5, 5]))[0].tolist()
    assert alone == together


def test_top_k_and_top_p_and_min_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    def support(params):
        toks, _ = sample(logits, _batch([params] * 400, list(range(400))))
        return set(toks.tolist())
    assert support(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert support(SamplingParams(temperature=1.0, min_p=0.25)) == {0, 1, 2}
    assert support(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}


def test_sampling_follows_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 4000
    logits = probs.log()[None].repeat(n, 1)
    toks, _ = sample(logits, _batch([SamplingParams(temperature=1.0)] * n, list(range(n))))
    freq = torch.bincount(toks, minlength=4).float() / n
    # 4 sigma of a binomial proportion at n=4000 is < 0.031
    assert (freq - probs).abs().max() < 0.031


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(2, 64)
    toks, _ = sample(logits, _batch([SamplingParams(), SamplingParams(temperature=5.0)], [None, 1]))
    assert toks[0] == logits[0].argmax()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(stop=("",)), "stop"),
        (dict(stop=tuple("abcdefghijklmnopq")), "stop"),
        (dict(stop_token_ids=(10**9,)), "stop_token_ids"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**kwargs).validate(vocab_size=1000)
