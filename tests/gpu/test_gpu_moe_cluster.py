"""A tiny Qwen3-MoE served with its decode pool as one expert-parallel group of 2 NCCL ranks
(device tool, three GPUs or more: one prefill worker, two decode ranks; KV over NCCL).

The GPU twin of tests/integration/test_moe_cluster.py: greedy tokens through the cluster
equal HF generate's on the same fp32 weights (HF on CPU), both ranks report their share of
the experts and the load they served, and every pool ends full. The tokenizer comes from
the directory in MINIINFER_GPU_MODEL (`python -m engine.loader.export smollm2-135m DIR`).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import time

import pytest
import torch

from tests.helpers import hf_greedy, save_tiny_qwen3_moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs three CUDA devices"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:"]
LENGTHS = [12, 5, 9, 16]
TOP_K = 2


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from engine.loader.registry import load_tokenizer

    src = os.environ.get("MINIINFER_GPU_MODEL")
    if not src or not os.path.isdir(src):
        pytest.fail("set MINIINFER_GPU_MODEL to a dir from `python -m engine.loader.export`")
    path = tmp_path_factory.mktemp("qwen3moe")
    for name in os.listdir(src):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(src, name), path)
    tok, base = load_tokenizer(src)
    hf = save_tiny_qwen3_moe(path, base, TOP_K, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8)
    return path, hf, tok


def test_two_rank_ep_group_over_nccl_matches_hf(moe_dir):
    import ray

    from cluster.background import BackgroundCluster
    from cluster.client import build_request
    from cluster.config import parse_config

    path, hf, tok = moe_dir
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True)
    pool = {"gpus_per_worker": 1, "num_pages": 256, "max_num_seqs": 8}
    cfg = parse_config({"model": str(path), "dtype": "fp32", "kv_dtype": "fp32", "device": "cuda",
                        "transport": "nccl", "router": {"port": 0}, "prefill": pool,
                        "decode": {**pool, "replicas": 2, "ep_size": 2}}, "gpu moe test")
    c = BackgroundCluster(cfg, quiet=False)
    try:
        def run(i: int) -> list[int]:
            req = build_request(PROMPTS[i], max_tokens=LENGTHS[i], temperature=0.0, ignore_eos=True)
            return [t for m in c.stub.Generate(req, timeout=120) for t in m.token_ids]

        assert run(0) == hf_greedy(hf, tok.encode(PROMPTS[0]), LENGTHS[0])  # one rank decodes, one idles
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            got = list(ex.map(run, range(len(PROMPTS))))
        for p, n, ids in zip(PROMPTS, LENGTHS, got):
            assert ids == hf_greedy(hf, tok.encode(p), n), p
        c.wait_pools_full(timeout=30)
        # every decode forward fed one token per request except its last (prefill made the
        # first); the two ranks' routed counts add up to TOP_K per token in each layer
        fed = LENGTHS[0] - 1 + sum(n - 1 for n in LENGTHS)
        deadline = time.monotonic() + 15  # the router polls worker statuses every 0.5 s
        while True:
            st = c.status()
            decode = sorted((w for p in st.pools if p.name == "decode" for w in p.workers),
                            key=lambda w: w.ep_rank)
            per_rank = [[sum(layer.tokens) for layer in w.expert_load] for w in decode]
            if [a + b for a, b in zip(*per_rank)] == [TOP_K * fed] * 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [(w.ep_rank, w.ep_size) for w in decode] == [(0, 2), (1, 2)]
        assert [a + b for a, b in zip(*per_rank)] == [TOP_K * fed] * 2
        assert all(layers[0] > 0 for layers in per_rank), "one rank never got a request"
    finally:
        c.close()
        ray.shutdown()
