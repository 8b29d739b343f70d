"""bench/gemv.py's whole-step A/B (GPU only) with the GPU parts faked: which kernel settings
each graph set is captured under, that they are put back, and the order of its parts."""

import types

import pytest
import torch

import bench.gemv as bg
import kernels.gemv as g
import kernels.prefetch as kp
from bench.shapes import shape
from engine.backend import Backend
from engine.config import ModelConfig

SETTINGS = ("NORM_MAX_K", "SPLIT_NORM", "EARLY_PREFETCH", "SPLIT_MAXNREG", "SPLIT_SCALE_AFTER")


@pytest.mark.parametrize("model,pdl", [("llama3-8b", True), ("llama3-8b", False), ("smollm2-135m", True)])
def test_each_graph_set_is_captured_under_its_settings(model, pdl, monkeypatch, capsys):
    cfg = ModelConfig.from_hf(shape(model))
    base = types.SimpleNamespace(prefetch=None, label="cuBLAS")
    engine = types.SimpleNamespace(runner=types.SimpleNamespace(graphs=base),
                                   backend=Backend("triton", None, None, pdl=pdl))
    captured, order = [], []

    def capture(model_, engine_, backend, max_bs, prefetch):
        assert backend.gemv_rows == 4 and max_bs == 1
        state = {k: getattr(g, k) for k in SETTINGS} | {"AHEAD_BYTES": kp.AHEAD_BYTES}
        captured.append(state)
        return types.SimpleNamespace(state=state)

    def times(sets, *args):
        order.append("timed")
        return {label: [5.0 - 0.01 * i] for i, label in enumerate(sets)}

    monkeypatch.setattr(bg, "ab_engine", lambda *a, **kw: (cfg, object(), engine))
    monkeypatch.setattr(bg, "_graph_set", capture)
    monkeypatch.setattr(bg, "decode_batch", lambda *a: "batch")
    monkeypatch.setattr(bg, "release", lambda *a: order.append("released"))
    monkeypatch.setattr(bg, "logits_of_each", lambda e, sets, sb: {k: torch.zeros(1, 8) for k in sets})
    monkeypatch.setattr(bg, "replay_rounds", times)
    monkeypatch.setattr(bg, "loop_rounds", lambda e, sets, *args: times(sets))
    monkeypatch.setattr(bg, "profile_sets", lambda e, sets, name, ctx, steps: order.append(("profiled", name)))
    before = {k: getattr(g, k) for k in SETTINGS} | {"AHEAD_BYTES": kp.AHEAD_BYTES}
    a = types.SimpleNamespace(batches=[1], ctx=512, loop_steps=8, gemv_rows=4, rounds=1, iters=1,
                              profile=10)
    rows = bg.engine_rows(model, a, 3e12)
    after = {k: getattr(g, k) for k in SETTINGS} | {"AHEAD_BYTES": kp.AHEAD_BYTES}
    assert after == before  # every setting put back
    labels = [r[2] for r in rows if r[1] == "replay b1"]
    assert labels[0] == "cuBLAS" and len(labels) == len(captured) + 1
    assert all(r[0] == model for r in rows)  # the model's name in every row
    sets = dict(zip(labels[1:], captured))
    apart = sets["gemv<=4, norms apart"]
    assert apart["NORM_MAX_K"] == 0 and not apart["SPLIT_NORM"] and not apart["EARLY_PREFETCH"]
    if model == "smollm2-135m":  # narrow rows: the norm fused in the GEMV after, no split sets
        assert list(sets) == ["gemv<=4, norms apart", "gemv<=4, norms fused"]
        assert sets["gemv<=4, norms fused"]["NORM_MAX_K"] == g.NORM_MAX_K
        assert not sets["gemv<=4, norms fused"]["SPLIT_NORM"]
    else:
        split = {k: v for k, v in sets.items() if "split" in k}
        assert all(s["SPLIT_NORM"] for s in split.values()) and len(split) == 3
        assert sets["gemv<=4, norms split, gate_up <= 80 regs"]["SPLIT_MAXNREG"] == {True: 80}
        assert sets["gemv<=4, norms split, scale after"]["SPLIT_SCALE_AFTER"]
        early = {k: v for k, v in sets.items() if "early" in k}
        if pdl:
            assert [s["EARLY_PREFETCH"] for s in early.values()] == [1, 2, 1]
            assert [s["AHEAD_BYTES"] for s in early.values()] == [0, 0, 8 << 20]
            assert not any(s["SPLIT_NORM"] for s in early.values())  # the shipped norms: apart
        else:
            assert early == {}  # the prefetches need PDL launches
    assert order == ["timed", "released", "timed", ("profiled", model)]  # profiles last
    out = capsys.readouterr().out
    assert "linear layers" in out and "norms apart" in out  # the table, before the profiles
