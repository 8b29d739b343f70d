"""Tiny random Qwen3-MoE / Mixtral checkpoints vs HF: logits, greedy tokens, the MoE block,
the auxiliary loss and the expert-load counts."""

import pytest
import torch

from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import dummy_model, load_model
from engine.moe import EPContext, MoEBlock, load_balancing_loss
from engine.sampling import SamplingParams
from tests.helpers import StepDriver, hf_greedy, rel_err

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15,
              rms_norm_eps=1e-6, tie_word_embeddings=False)


def _configs():
    return {
        "qwen3_moe": transformers.Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=96,
                                                 moe_intermediate_size=48, num_experts=8,
                                                 num_experts_per_tok=3, norm_topk_prob=False),
        "mixtral": transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=6,
                                              num_experts_per_tok=2),
    }


@pytest.fixture(scope="module", params=sorted(_configs()))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(4321)
    hf = transformers.AutoModelForCausalLM.from_config(_configs()[request.param], dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_model(str(path), quiet=True), path


def test_arch_and_expert_shapes(checkpoint):
    name, hf, ours, _ = checkpoint
    c = ours.config
    assert c.arch == name and c.is_moe
    assert c.num_experts == hf.config.to_dict().get("num_experts", hf.config.to_dict().get("num_local_experts"))
    block = ours.model.layers[0].mlp
    assert isinstance(block, MoEBlock) and block.renormalize == (name == "mixtral")
    assert block.w13.shape == (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size)


def test_prefill_and_decode_logits_match_hf(checkpoint):
    _, hf, ours, _ = checkpoint
    prompt = torch.randint(0, 256, (19,), generator=torch.Generator().manual_seed(3)).tolist()
    driver = StepDriver(ours.model)
    req, logits = driver.start(prompt)
    seq = list(prompt)
    with torch.no_grad():
        assert rel_err(logits, hf(torch.tensor([seq])).logits[0]) < 1e-4
        for _ in range(6):
            seq.append(int(logits[-1].argmax()))
            logits = driver.feed(req, seq[-1])
            assert rel_err(logits, hf(torch.tensor([seq])).logits[0, -1:]) < 1e-4
    driver.release(req)
    assert driver.pool.is_full()


def test_greedy_tokens_identical_to_hf_generate(checkpoint):
    _, hf, ours, _ = checkpoint
    engine = LLMEngine(ours, EngineConfig(num_pages=64))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (4, 23)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    hf.generation_config.eos_token_id = None
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 16)
    assert engine.pool.is_full()
    load = ours.model.expert_load(reset=True)
    assert len(load) == ours.config.num_layers and all(sum(row) > 0 for row in load)
    assert all(sum(row) % ours.config.num_experts_per_tok == 0 for row in load)
    ours.model.idle_step()  # an idle rank's step: every MoE layer, no tokens
    assert ours.model.expert_load() == [[0] * ours.config.num_experts] * ours.config.num_layers


def _hf_block(kind: str, norm: bool = False):
    cfgs = _configs()
    cfg = cfgs[kind]
    if kind == "qwen3_moe":
        cfg.norm_topk_prob = norm
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    else:
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.eval(), ModelConfig.from_hf(cfg.to_dict() | {"architectures": None})


def _ours_from(hf_block, cfg: ModelConfig, ep: EPContext | None = None) -> MoEBlock:
    """Our block filled through the loader's path from HF's stacked (transformers 5) tensors."""
    block = MoEBlock(cfg, ep)
    for name, t in hf_block.state_dict().items():
        mod, _, kind = name.rpartition(".") if name.endswith(".weight") else (name, "", "")
        dst, src = block.hf_target("mlp." + mod, kind, t)
        with torch.no_grad():
            dst.copy_(src)
    return block


@pytest.mark.parametrize("kind,norm", [("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", False)])
def test_block_matches_hf_block(kind, norm):
    hf, cfg = _hf_block(kind, norm)
    ours = _ours_from(hf, cfg)
    assert ours.renormalize == (norm or kind == "mixtral")
    x = torch.randn(37, cfg.hidden_size)
    _, _, ref_ids = hf.gate(x)
    counts = torch.bincount(ref_ids.reshape(-1), minlength=cfg.num_experts)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x[None])[0], rtol=1e-5, atol=1e-5)
        assert ours.expert_load()["last_step"] == counts.tolist()
        assert ours(x[:0]).shape == (0, cfg.hidden_size)  # an empty batch is fine too
        ours(x[:5])
    load = ours.expert_load()
    assert load["last_step"] == torch.bincount(ref_ids[:5].reshape(-1), minlength=cfg.num_experts).tolist()
    assert load["routed"] == (counts + torch.tensor(load["last_step"])).tolist()
    assert sum(load["served"].values()) == sum(load["routed"])  # one rank: it serves what it routes
    routed = torch.tensor(load["routed"]).float()
    assert load["imbalance"] == pytest.approx((routed.max() / routed.mean()).item())


def test_load_balancing_loss_matches_formula_and_hf():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    gen = torch.Generator().manual_seed(9)
    e, k = 8, 2
    for logits in (torch.randn(50, e, generator=gen), torch.randn(50, e, generator=gen) * 0.01):
        probs = torch.softmax(logits, -1)
        ids = torch.topk(probs, k, -1).indices
        direct = e * sum((ids == i).sum().item() / 50 * probs[:, i].mean().item() for i in range(e))
        ours = load_balancing_loss(probs, ids, e)
        assert ours.item() == pytest.approx(direct, rel=1e-5)
        assert ours.item() == pytest.approx(load_balancing_loss_func((logits,), e, k).item(), rel=1e-5)
    # collapse onto one expert costs more than near-uniform routing
    skew = torch.zeros(50, e)
    skew[:, 0] = 10.0
    p = torch.softmax(skew, -1)
    assert load_balancing_loss(p, torch.topk(p, k, -1).indices, e) > 2 * k * 0.9


def test_dummy_weights_do_not_depend_on_ep_layout(checkpoint):
    _, _, ours, _ = checkpoint
    cfg = ours.config
    full = dummy_model(cfg, seed=3)
    assert all(p.abs().sum() > 0 for p in full.parameters())
    for rank in range(2):
        part = dummy_model(cfg, seed=3, ep=EPContext(rank=rank, size=2))
        got, want = part.layers[1].mlp, full.layers[1].mlp
        assert got.w13.shape[0] == len(got.local_experts) < cfg.num_experts
        assert torch.equal(got.w13, want.w13[got.local_experts])
        assert torch.equal(got.w2, want.w2[got.local_experts])
        assert torch.equal(got.gate.weight, want.gate.weight)
        assert torch.equal(part.layers[1].attn.qkv.weight, full.layers[1].attn.qkv.weight)


def test_loading_keeps_only_owned_experts(checkpoint):
    _, hf, _, path = checkpoint
    ep = EPContext(rank=1, size=2, placement=tuple(e % 2 for e in range(hf.config.to_dict().get(
        "num_experts") or hf.config.num_local_experts)))
    part = load_model(str(path), quiet=True, ep=ep).model.layers[0].mlp
    stacked = hf.model.layers[0].mlp.experts
    assert part.local_experts == list(range(1, len(ep.placement), 2))
    assert torch.equal(part.w13, stacked.gate_up_proj[part.local_experts])
    assert torch.equal(part.w2, stacked.down_proj[part.local_experts])
    # transformers 5's in-memory names (stacked experts) load too
    model = dummy_model(load_model(str(path), quiet=True).config, seed=1, ep=ep)
    for name, t in hf.state_dict().items():
        model.load_hf_weight(name, t)
    for a, b in zip(model.parameters(), load_model(str(path), quiet=True, ep=ep).model.parameters()):
        assert torch.equal(a, b)


def test_bad_placement_is_rejected():
    with pytest.raises(ValueError, match="one rank per expert"):
        EPContext(rank=0, size=2, placement=(0, 1)).owners(4)
    with pytest.raises(ValueError, match="ranks must be in"):
        EPContext(rank=0, size=2, placement=(0, 1, 2, 1)).owners(4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_block_on_gpu_grouped_gemm_and_kernel_routing(kind, monkeypatch):
    import engine.moe
    from engine.layers import TritonOps

    hf, cfg = _hf_block(kind, norm=True)
    x = torch.randn(300, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    ours = _ours_from(hf, cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        fast = ours(x, TritonOps())  # Triton routing + torch._grouped_mm experts
        monkeypatch.setattr(engine.moe, "GROUPED_MM", False)
        loop = ours(x, TritonOps())  # the same routing, a loop over experts
    assert rel_err(fast, loop) < 2e-2
    assert ours.expert_load()["routed"] == (2 * torch.bincount(ours.route(x, TritonOps())[1].flatten(),
                                                                minlength=cfg.num_experts)).tolist()
