"""The host side of a step: token slices, block tables, CUDA-graph input rows (no GPU)."""

import numpy as np
import pytest
import torch

from decode.graphs import StagedInputs, fill_graph_inputs
from engine.request import Request
from engine.runner import HostStep
from engine.sampling import SamplingParams


def test_token_ids_equals_slices_of_all_token_ids():
    req = Request([5, 6, 7, 8], SamplingParams())
    req.output_token_ids = [9, 10, 11]
    every = req.all_token_ids
    for start in range(len(every) + 1):
        for end in range(start, len(every) + 1):
            assert req.token_ids(start, end) == every[start:end], (start, end)


def _step(tables, ctx_lens):
    n = len(tables)
    return HostStep(list(range(100, 100 + n)), [c - 1 for c in ctx_lens],
                    [t[-1] * 16 + (c - 1) % 16 for t, c in zip(tables, ctx_lens)],
                    [1] * n, ctx_lens, tables, list(range(n)), [None] * n, [None] * n)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_table_array_pads_ragged_tables_with_zeros(dtype):
    tables = [[7, 3, 9], [4], [12, 2]]
    out = _step(tables, [40, 5, 20]).table_array(dtype)
    assert out.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
    assert out.tolist() == [[7, 3, 9], [4, 0, 0], [12, 2, 0]]


def test_fill_graph_inputs_pad_rows_store_and_read_nothing():
    step = _step([[7, 3, 9], [4]], [40, 5])
    inputs = np.full((4, 6), 99, dtype=np.int64)  # what earlier steps left in the host twin
    tables = np.full((4, 5), 99, dtype=np.int32)
    fill_graph_inputs(step, 4, inputs, tables)
    assert inputs[:, :2].tolist() == [step.input_ids, step.positions, step.slots, step.ctx_lens]
    # padding columns: token 0 at position 0, slot -1 (no store), context 0 (no read)
    assert inputs[:, 2:4].tolist() == [[0, 0], [0, 0], [-1, -1], [0, 0]]
    assert inputs[:, 4:].tolist() == [[99, 99]] * 4  # past the bucket: another graph's
    # each sequence's pages, then 0 (an earlier, longer table must not show through)
    assert tables[:2].tolist() == [[7, 3, 9, 0, 0], [4, 0, 0, 0, 0]]
    assert tables[2:].tolist() == [[99] * 5] * 2  # rows of padding sequences are never read


def test_host_step_bench_runs(capsys, monkeypatch):
    """bench/host_step.py on a tiny batch: it builds real steps and prints its three rows."""
    from bench import host_step

    monkeypatch.setattr("sys.argv", ["host_step.py", "--batch", "3", "--ctx", "70", "--iters", "2"])
    assert host_step.main() == 0
    out = capsys.readouterr().out
    assert "collect" in out and "graph inputs" in out and "total" in out


def test_staged_inputs_one_buffer_aligned_fields_prefix_upload():
    staged = StagedInputs({"a": ((2, 3), torch.int64), "b": ((5,), torch.int32),
                           "c": ((2, 2), torch.int32)}, torch.device("cpu"))
    assert staged.offsets == {"a": 0, "b": 48, "c": 72}  # b ends at 68: c starts 8-aligned
    host = staged.host()
    host["a"][:] = [[1, 2, 3], [4, 5, 6]]
    host["b"][:] = 7
    host["c"][:] = 9
    assert staged.device["c"].tolist() == [[0, 0], [0, 0]]  # nothing moves before upload
    staged.upload(rows=1)  # a, b and the first row of c (the last field)
    assert staged.device["a"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert staged.device["b"].tolist() == [7] * 5
    assert staged.device["c"].tolist() == [[9, 9], [0, 0]]
    staged.upload()
    assert staged.device["c"].tolist() == [[9, 9], [9, 9]]
    assert staged.device["a"].dtype == torch.int64 and staged.device["c"].dtype == torch.int32
