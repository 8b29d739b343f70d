"""Decode and verify graphs (decode/graphs.py): what a replay computes from staged inputs.

CUDA graphs need a GPU, but a replay computes the runner's captured step over its static
buffers, which `run` fills through the host twin (`StagedInputs`). Here a stand-in graph
runs that step eagerly (through the Triton interpreter on CPU), so the staged inputs and
the padding rules are checked in CI: the logits and the captured argmax equal the eager
step's, padding stores nothing, and a narrower table after a wider one leaves no stale
pages. tests/gpu/ replays real graphs on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from decode.graphs import CudaGraphRunner, VerifyGraphRunner  # noqa: E402
from engine.page_pool import PagePool  # noqa: E402
from engine.request import Request, ScheduledBatch, ScheduledSeq  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.kernels.stand_in_graph import StepAsGraph, tiny_runner  # noqa: E402

PAGES, VOCAB = 40, 64


def _setup(device, kv_dtype, q_len=None):
    runner = tiny_runner(device, kv_dtype, PAGES, max_position=256)
    model, cache, backend = runner.model, runner.cache, runner.backend
    args = (model, cache, backend, 4, 256)  # buckets 1, 2, 4; 16 pages a table
    graphs = CudaGraphRunner(*args) if q_len is None else VerifyGraphRunner(*args, q_len=q_len)
    rows = q_len or 1
    graphs.graphs = {b: StepAsGraph(graphs, b) for b in graphs.buckets}
    graphs.logits = {b: torch.empty(b * rows, VOCAB, device=device) for b in graphs.buckets}
    if q_len is None:
        graphs.argmax = {b: torch.empty(b, dtype=torch.int64, device=device) for b in graphs.buckets}
    return runner, graphs, PagePool(PAGES)


def _batch(pool, ctx_lens, q_len=1, seed=0):
    """Sequences already holding ctx - q_len tokens of KV, each feeding its last q_len."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in ctx_lens:
        req = Request(torch.randint(3, VOCAB, (n,), generator=g).tolist(), SamplingParams())
        req.pages = pool.allocate(-(-n // 16))
        req.num_computed_tokens = n - q_len
        seqs.append(ScheduledSeq(req, q_len, True))
    return ScheduledBatch(seqs)


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [cache.data] + ([cache.scales] if cache.quantized else [])


def _replay_vs_eager(runner, batch, replay, eager):
    """-> (replayed, eager) outputs from the same cache state; checks that the replay
    wrote only the batch's slots, and the same values as the eager step."""
    step = runner.collect(batch)
    before = [t.clone() for t in _cache_tensors(runner.cache)]
    with torch.inference_mode():
        got = replay(step).clone()
        after = [t.clone() for t in _cache_tensors(runner.cache)]
        for t, b in zip(_cache_tensors(runner.cache), before):
            t.copy_(b)
        want = eager(step)
    untouched = [p for p in range(PAGES) if p not in {s // 16 for s in step.slots}]
    for a, b, w in zip(after, before, _cache_tensors(runner.cache)):
        assert torch.equal(a[:, :, untouched], b[:, :, untouched]), "padding wrote a page"
        torch.testing.assert_close(a.float(), w.float(), rtol=1e-4, atol=1e-4)
    return got, want


# tables of 3 pages, then 1 (bucket 1), then 7 and up in a full bucket, then 2 rows again:
# each run must overwrite what the last one left in the host twin's rows
CTX_RUNS = ([40, 5, 33], [9], [100, 3, 17, 64], [20, 2])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_decode_replay_and_its_argmax_match_eager(device, kv_dtype):
    runner, graphs, pool = _setup(device, kv_dtype)
    for i, ctx in enumerate(CTX_RUNS):
        batch = _batch(pool, ctx, seed=i)
        got, want = _replay_vs_eager(runner, batch, graphs.run,
                                     lambda s: runner.sampled_logits(s, use_graphs=False))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert graphs.argmax[graphs.bucket_for(len(ctx))][: len(ctx)].tolist() == want.argmax(-1).tolist()
        for s in batch.seqs:
            assert graphs.block_tables[batch.seqs.index(s)].tolist() == (
                s.request.pages + [0] * (16 - len(s.request.pages)))
            pool.free(s.request.pages)
    assert graphs.replays == len(CTX_RUNS) and pool.num_free == PAGES


def test_greedy_decode_takes_its_tokens_from_the_graph(device, monkeypatch):
    runner, graphs, pool = _setup(device, torch.float32)
    runner.graphs = graphs
    for i, ctx in enumerate(CTX_RUNS):
        batch = _batch(pool, ctx, seed=i)
        with torch.inference_mode():
            want = runner.sampled_logits(runner.collect(batch), use_graphs=False).argmax(-1)
        with monkeypatch.context() as m:
            m.setattr(runner, "sampled_logits", None)  # the graph path must not need it
            assert runner.execute(batch).token_ids == want.tolist()
        for s in batch.seqs:
            pool.free(s.request.pages)
    assert graphs.replays == len(CTX_RUNS) and pool.num_free == PAGES


def test_verify_replay_matches_eager(device):
    runner, graphs, pool = _setup(device, torch.float32, q_len=2)
    for i, ctx in enumerate(CTX_RUNS):
        batch = _batch(pool, ctx, q_len=2, seed=i)
        got, want = _replay_vs_eager(runner, batch, graphs.run,
                                     lambda s: runner.model.compute_logits(runner.forward(runner.to_inputs(s))))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for s in batch.seqs:
            pool.free(s.request.pages)
    with pytest.raises(ValueError, match="logits only"):
        graphs.run(runner.collect(_batch(pool, [5], q_len=2)), tokens=True)
    if device == "cpu":  # on a GPU this would capture for real
        with pytest.raises(ValueError, match="CUDA KV cache"):
            graphs.capture()


def test_run_ahead_replay_feeds_the_step_befores_argmax(device):
    """Decode run-ahead through the graphs: step 2 is launched before step 1's tokens are
    read, its ids copied from step 1's captured argmax on the device; both equal two
    steps run one after the other (each fed its token from the host)."""
    runner, graphs, pool = _setup(device, torch.float32)
    runner.graphs = graphs
    batch = _batch(pool, [40, 15, 33], seed=4)  # the 15-token one's next step opens page 2
    saved = [t.clone() for t in _cache_tensors(runner.cache)]
    for s in batch.seqs:
        r = s.request
        r.pages += pool.allocate(-(-(r.num_computed_tokens + 2) // 16) - len(r.pages))
    want = []
    for _ in range(2):
        want.append(runner.execute(batch).token_ids)
        for s, tok in zip(batch.seqs, want[-1]):
            s.request.num_computed_tokens += 1
            s.request.output_token_ids.append(tok)
    for t, b in zip(_cache_tensors(runner.cache), saved):
        t.copy_(b)
    for s in batch.seqs:
        s.request.num_computed_tokens -= 2
        del s.request.output_token_ids[-2:]
    first = runner.launch(runner.collect(batch))
    second = runner.launch(runner.collect_next(batch), ids=first.device)
    assert [first.wait().token_ids, second.wait().token_ids] == want
    assert want[0] != want[1] and graphs.replays == 4
