"""The CPU engine's transposed linear layers compute what nn.Linear does."""

import torch
from torch import nn

from engine.layers import CPULinear, transpose_linears


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.inner = nn.Sequential(nn.Linear(16, 24, bias=True), nn.ReLU(), nn.Linear(24, 16, bias=False))
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as SmolLM2's

    def forward(self, ids):
        return self.lm_head(self.inner(self.embed(ids)))


def test_transposed_linears_match_nn_linear_and_keep_weights_readable():
    torch.manual_seed(0)
    model = _Tiny().eval()
    ids = torch.tensor([[1, 7, 42, 3]])
    with torch.no_grad():
        want = model(ids)
        weights = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert transpose_linears(model) == 3
        assert transpose_linears(model) == 0  # idempotent: nothing left to swap
        got = model(ids)
        for t in (ids[:, :1], ids):  # one row (a batch-1 decode step) and several
            torch.testing.assert_close(model(t), want[:, : t.shape[1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, CPULinear) and torch.equal(layer.weight, w)
        assert layer.w_t.is_contiguous() and layer.w_t.shape == w.t().shape
    assert model.inner[0].bias is not None and model.inner[2].bias is None
    # the tied head got its own transposed copy; the embedding still looks up its rows
    assert isinstance(model.embed, nn.Embedding) and torch.equal(model.embed.weight, weights["lm_head"])


def test_cpu_engine_uses_the_transposed_layout_unless_told_not_to():
    from engine.config import ModelConfig
    from engine.llm import EngineConfig, LLMEngine
    from engine.loader.registry import LoadedModel
    from engine.models import build_model
    from engine.sampling import SamplingParams

    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    outs = {}
    for transposed in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            for prm in model.parameters():
                prm.normal_(0.0, 0.3)
        eng = LLMEngine(LoadedModel(model, None, cfg, "tiny", 0.0),
                        EngineConfig(kv_dtype="fp32", num_pages=16, cpu_transposed_weights=transposed))
        linears = [m for m in model.modules() if isinstance(m, (nn.Linear, CPULinear))]
        assert linears and all(isinstance(m, CPULinear) == transposed for m in linears)
        outs[transposed] = eng.generate([[1, 5, 9]], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert outs[True] == outs[False]
