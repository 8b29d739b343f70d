"""A stand-in for a captured CUDA graph, so graph runners' padding rules run in CI on CPU."""


class StepAsGraph:
    """Replays by recomputing what `decode.graphs.capture_buckets` captures, eagerly, over the
    runner's static buffers: `_step(key)` into its static logits, and their argmax into its
    static argmax when it has one for `key`."""

    def __init__(self, runner, key: int) -> None:
        self.runner, self.key = runner, key

    def replay(self) -> None:
        logits = self.runner._step(self.key)
        self.runner.logits[self.key].copy_(logits)
        if self.key in self.runner.argmax:
            self.runner.argmax[self.key].copy_(logits.argmax(dim=-1))


def tiny_runner(device, kv_dtype, num_pages: int, max_position: int):
    """A 2-layer model (vocab 64, GQA 4/2, head_dim 16) on the triton backend, over a cache of
    random pages (every page holds something: a stray read or write shows) -> ModelRunner."""
    from engine.backend import select_backend
    from engine.config import ModelConfig
    from engine.kv_cache import KVCache, KVCacheSpec
    from engine.loader.registry import dummy_model
    from engine.runner import ModelRunner

    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2, head_dim=16,
                      max_position=max_position, arch="llama", num_heads=4, num_kv_heads=2)
    model = dummy_model(cfg, seed=0, device=device)
    cache = KVCache(KVCacheSpec(cfg.num_layers, num_pages, cfg.num_kv_heads, cfg.head_dim, kv_dtype),
                    device)
    if cache.quantized:
        cache.data.random_(-127, 128)
        cache.scales.uniform_(0.01, 0.05)
    else:
        cache.data.normal_()
    return ModelRunner(model, cache, device, select_backend(device, "triton"))
