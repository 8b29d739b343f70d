"""Speculative decoding on GPU: tokens/s and acceptance, with and without speculation.

One engine per drafter (none | ngram | draft), each run at batch 1, 8 and 32 over the same
prompts, greedy, `max_tokens` new tokens per request, EOS ignored. Weights are seeded
random (bench/shapes.py shapes, bf16 on the GPU), so the workload is made explicit:

- prompts: per sequence, a random segment of `--segment` tokens repeated `--repeats`
  times (a code / extraction-like prompt that repeats itself);
- continuation: what the random target generates greedily from it. Random-weight models
  fall into short loops, which the n-gram drafter then predicts from the context;
- draft model (`draft:N`): the target's own first N layers, final norm and LM head
  (engine.spec.truncated_model), with its own KV cache. With random weights a shallow
  draft rarely agrees with the full target; deeper ones agree more and cost more.

tokens/s = generated tokens / wall time of `LLMEngine.generate` (prefill included, the
same for every row). `same` = fraction of requests whose tokens equal the no-speculation
run's (bf16: verify attention sums in another order than decode attention, so a near-tie
can flip; the fp32 GPU test checks exact equality). Acceptance rate = accepted / drafted
drafts; tokens/step = tokens a verify step emitted per sequence (accepted + 1).

    python bench/spec_decode.py [--shape smollm2-135m] [--k 4] [--drafters none,ngram,draft:4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import JsonLines, format_table, progress
from bench.shapes import shape
from engine.config import ModelConfig
from engine.llm import EngineConfig, LLMEngine
from engine.loader.registry import LoadedModel, dummy_model, random_model
from engine.sampling import SamplingParams
from engine.spec import SpecMetrics

OUT = JsonLines(os.environ.get("SPEC_DECODE_JSON"))


def prompts(n: int, vocab: int, segment: int, repeats: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (segment,), generator=g).tolist() * repeats for _ in range(n)]


def run_engine(engine: LLMEngine, batch: list[list[int]], max_tokens: int):
    """-> (seconds, token lists, spec stats) of one generate over the batch."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(batch[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # settle allocator
    if engine.runner.spec is not None:
        engine.runner.spec.metrics = SpecMetrics()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(batch, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, [c.token_ids for c in out], engine.spec_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--segment", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--drafters", default="none,ngram,draft:4,draft:15",
                    help="comma list: none | ngram | draft[:layers]; none first (the baseline)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.max_tokens, args.repeats = "1,2", 12, 3
    batches = [int(b) for b in args.batches.split(",")]
    cfg = ModelConfig.from_hf(shape(args.shape))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":
        model = random_model(cfg, seed=0, dtype=dtype, device="cuda")
    else:
        model = dummy_model(cfg, seed=0, dtype=dtype, device="cpu")
    loaded = LoadedModel(model, None, cfg, args.shape, 0.0)
    work = prompts(max(batches), cfg.vocab_size, args.segment, args.repeats)
    rows, base = [], {}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    for item in args.drafters.split(","):
        drafter, _, layers = item.partition(":")  # "draft:8" = the target's first 8 layers
        layers = int(layers or args.draft_layers)
        config = EngineConfig(num_pages=4096, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                              spec_drafter=drafter, spec_k=args.k, spec_draft_layers=layers)
        try:
            engine = LLMEngine(loaded, config, args.device)
        except Exception:  # report and go on: one broken configuration must not hide the others
            traceback.print_exc()
            continue
        progress(f"{drafter}: warm-up {engine.warmup_seconds:.1f}s")
        for b in batches:
            try:
                secs, toks, stats = run_engine(engine, work[:b], args.max_tokens)
            except Exception:
                traceback.print_exc()
                continue
            n = sum(len(t) for t in toks)
            tps = n / secs
            if drafter == "none":
                base[b] = (tps, toks)
            ref = base.get(b)
            same = sum(a == r for a, r in zip(toks, ref[1])) / b if ref else None
            speedup = tps / ref[0] if ref else None
            rec = {"shape": args.shape, "device": device_name, "drafter": drafter, "k": args.k,
                   "draft_layers": layers if drafter == "draft" else None, "batch": b,
                   "tokens": n, "seconds": round(secs, 4), "tokens_per_s": round(tps, 1),
                   "speedup": None if speedup is None else round(speedup, 3), "same_as_none": same,
                   "warmup_s": round(engine.warmup_seconds, 2), **stats}
            OUT.emit(rec)
            rows.append([item, b, round(tps, 1), speedup, stats.get("spec_acceptance_rate"),
                         stats.get("spec_tokens_per_step"), same])
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"# speculative decoding, {args.shape} (random {str(dtype)[6:]} weights) on {device_name}, "
          f"k={args.k}, draft:N = the target's first N layers, {args.max_tokens} new tokens/request")
    print(format_table(["drafter", "batch", "tok/s", "speedup", "accept rate", "tokens/step", "same"], rows))


if __name__ == "__main__":
    main()
