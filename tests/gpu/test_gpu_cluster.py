"""1P1D on two GPUs: KV over a pairwise NCCL group and over gRPC (device tool, nvidia-h200-x2).

The bundled GGUF cannot travel to the GPU machine, so the test reads a config + tokenizer
directory exported by `python -m engine.loader.export smollm2-135m DIR` (MINIINFER_GPU_MODEL)
and every process builds the same seeded bf16 dummy weights on its GPU.
"""

from __future__ import annotations

import concurrent.futures as cf
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:"]


@pytest.fixture(scope="module")
def model_dir():
    d = os.environ.get("MINIINFER_GPU_MODEL")
    if not d or not os.path.isdir(d):
        pytest.fail("set MINIINFER_GPU_MODEL to a dir from `python -m engine.loader.export`")
    return d


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_tokens(model_dir):
    from engine.llm import EngineConfig, LLMEngine
    from engine.loader.registry import load_model
    from engine.sampling import SamplingParams

    lm = load_model(model_dir, torch.bfloat16, "cuda", quiet=True, dummy_weights=True)
    eng = LLMEngine(lm, EngineConfig(kv_dtype="int8", num_pages=512, max_num_seqs=16), "cuda")
    out = [eng.generate([lm.tokenizer.encode(p)], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
           for p in PROMPTS]
    del eng, lm
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("transport", ["nccl", "grpc"])
def test_1p1d_two_gpus(transport, model_dir, ray_gpu, local_tokens):
    from cluster.background import BackgroundCluster
    from cluster.client import build_request
    from cluster.config import parse_config

    pool = {"gpus_per_worker": 1, "num_pages": 512, "max_num_seqs": 16}
    cfg = parse_config({"model": model_dir, "dummy_weights": True, "dtype": "bf16", "kv_dtype": "int8",
                        "device": "cuda", "transport": transport, "router": {"port": 0},
                        "prefill": pool, "decode": pool}, "gpu test")
    c = BackgroundCluster(cfg, quiet=False)
    try:
        def run(p):
            req = build_request(p, max_tokens=24, temperature=0.0, ignore_eos=True)
            return [t for m in c.stub.Generate(req, timeout=120) for t in m.token_ids]

        for p, want in zip(PROMPTS, local_tokens):
            assert run(p) == want, p
        with cf.ThreadPoolExecutor(16) as ex:
            outs = list(ex.map(run, PROMPTS * 4))
        assert all(len(o) == 24 for o in outs)
        st = c.wait_pools_full()
        workers = [w for p in st.pools for w in p.workers]
        assert len(workers) == 2 and all(w.pages_used == 0 for w in workers)
    finally:
        c.close()
