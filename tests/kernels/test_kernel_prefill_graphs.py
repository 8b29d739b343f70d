"""Prefill graphs (prefill/graphs.py): the padded, fixed-shape step they capture.

CUDA graphs need a GPU, but what a replay computes is `PrefillGraphRunner._step` over its
static buffers after `run` filled them. Here a stand-in graph runs that step directly
(through the Triton interpreter on CPU), so the padding rules are checked in CI: padding
tokens belong to no sequence and store nothing, padding sequences read nothing, and the
sampled rows' logits equal the eager step's. tests/gpu/test_gpu_engine.py replays real
graphs on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from engine.page_pool import PagePool  # noqa: E402
from engine.request import Request, ScheduledBatch, ScheduledSeq  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from prefill.graphs import PrefillGraphRunner, token_buckets  # noqa: E402
from tests.kernels.stand_in_graph import StepAsGraph, tiny_runner  # noqa: E402

PAGES = 16


def test_token_buckets():
    assert token_buckets(512) == [16, 32, 64, 128, 192, 256, 384, 512]
    assert token_buckets(1024)[-3:] == [512, 768, 1024]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(8) == [8]
    with pytest.raises(ValueError, match="max_prefill_graph_tokens"):
        token_buckets(0)


def _setup(device, kv_dtype):
    runner = tiny_runner(device, kv_dtype, PAGES, max_position=128)
    model, cache, backend = runner.model, runner.cache, runner.backend
    graphs = PrefillGraphRunner(model, cache, backend, max_tokens=32, max_seqs=4, max_model_len=128)
    graphs.graphs = {t: StepAsGraph(graphs, t) for t in graphs.buckets}
    graphs.logits = {t: torch.empty(4, model.cfg.vocab_size, device=device) for t in graphs.buckets}
    graphs.argmax = {t: torch.empty(4, dtype=torch.int64, device=device) for t in graphs.buckets}
    return runner, graphs, PagePool(PAGES)


def _seq(pool, prompt, done, new, sample=True, outputs=()):
    req = Request(list(prompt), SamplingParams())
    req.output_token_ids.extend(outputs)
    req.num_computed_tokens = done
    req.pages = pool.allocate(-(-(done + new) // 16))
    return ScheduledSeq(req, new, sample)


def _batches(pool):
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(3, 64, (n,), generator=g).tolist()

    yield "one prompt, 19 tokens in the 32 bucket", [_seq(pool, prompt(19), 0, 19)]
    yield "a chunk over a 16-token prefix + a new prompt + a chunk that samples nothing", [
        _seq(pool, prompt(40), 16, 10), _seq(pool, prompt(5), 0, 5), _seq(pool, prompt(30), 0, 17, sample=False)]
    yield "a prefill chunk with decode rows (mixed batch)", [
        _seq(pool, prompt(20), 0, 20), _seq(pool, prompt(20), 20, 1, outputs=[7]),
        _seq(pool, prompt(47), 47, 1, outputs=[9])]
    yield "a full bucket: 32 tokens over 4 sequences", [
        _seq(pool, prompt(8), 0, 8), _seq(pool, prompt(8), 0, 8), _seq(pool, prompt(20), 12, 8),
        _seq(pool, prompt(8), 0, 8)]


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [cache.data] + ([cache.scales] if cache.quantized else [])


# Padding rows' attention output is left unwritten (whatever the buffer held): the
# interpreter's numpy warns when that garbage overflows in their (discarded) MLP rows.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_padded_step_matches_eager(device, kv_dtype):
    runner, graphs, pool = _setup(device, kv_dtype)
    for name, seqs in _batches(pool):
        step = runner.collect(ScheduledBatch(seqs))
        before = [t.clone() for t in _cache_tensors(runner.cache)]
        with torch.inference_mode():
            replayed = graphs.run(step)
            assert replayed is not None, name
            replayed = replayed.clone()
            after_graph = [t.clone() for t in _cache_tensors(runner.cache)]
            for t, b in zip(_cache_tensors(runner.cache), before):
                t.copy_(b)
            eager = runner.sampled_logits(step, use_graphs=False)
        assert replayed.shape == (len(step.logits_rows), 64), name
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4, msg=name)
        # the same slots written, with the same values; no other page touched
        written = {slot // 16 for slot in step.slots}
        untouched = [p for p in range(PAGES) if p not in written]
        for got, b, want in zip(after_graph, before, _cache_tensors(runner.cache)):
            assert torch.equal(got[:, :, untouched], b[:, :, untouched]), name
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4, msg=name)
        for s in seqs:
            pool.free(s.request.pages)
    assert graphs.replays == 4
    assert pool.num_free == PAGES


def test_steps_that_do_not_fit_run_eager(device):
    runner, graphs, pool = _setup(device, torch.float32)
    long = _seq(pool, list(range(3, 36)), 0, 33)
    assert graphs.run(runner.collect(ScheduledBatch([long]))) is None  # 33 tokens > 32
    pool.free(long.request.pages)
    many = [_seq(pool, [5, 6], 0, 2) for _ in range(5)]
    assert graphs.run(runner.collect(ScheduledBatch(many))) is None  # 5 sequences > 4
    for s in many:
        pool.free(s.request.pages)
    # pure decode steps belong to the decode graphs (or run eager), never to these
    runner.prefill_graphs = graphs
    decode = [_seq(pool, [5, 6, 7], 3, 1, outputs=[9]) for _ in range(2)]
    with torch.inference_mode():
        runner.sampled_logits(runner.collect(ScheduledBatch(decode)))
    for s in decode:
        pool.free(s.request.pages)
    assert graphs.replays == 0 and pool.num_free == PAGES
    if device == "cpu":  # on a GPU this would capture for real
        with pytest.raises(ValueError, match="CUDA KV cache"):
            graphs.capture()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_greedy_steps_take_their_tokens_from_the_graph(device, monkeypatch):
    """A greedy step that fits a bucket returns the graph's captured argmax: no logits leave
    the graph and no eager pass runs; the tokens are the eager step's argmax."""
    runner, graphs, pool = _setup(device, torch.float32)
    runner.prefill_graphs = graphs
    for name, seqs in _batches(pool):
        batch = ScheduledBatch(seqs)
        with torch.inference_mode():
            want = runner.sampled_logits(runner.collect(batch), use_graphs=False).argmax(-1)
        replays = graphs.replays
        with monkeypatch.context() as m:
            m.setattr(runner, "sampled_logits", None)  # the graph path must not need it
            got = runner.execute(batch).token_ids
        assert graphs.replays == replays + 1, name
        assert got == want.tolist() and len(got) == sum(s.sample for s in seqs), name
        for s in seqs:
            pool.free(s.request.pages)
    assert pool.num_free == PAGES
