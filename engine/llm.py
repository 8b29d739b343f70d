"""LLMEngine: one process, one model, continuous batching. Also the "colocated" baseline."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.backend import BACKENDS, select_backend
from engine.errors import InvalidRequest
from engine.kv_cache import KVCache, KVCacheSpec, resolve_kv_dtype
from engine.layers import transpose_linears
from engine.loader.registry import LoadedModel, load_model
from engine.page_pool import PAGE_SIZE, PagePool
from engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    ScheduledBatch,
    ScheduledSeq,
    StepOutput,
)
from engine.runner import ModelRunner, PendingTokens
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.spec import build_spec_decoder
from engine.textstream import TextStream

if TYPE_CHECKING:
    from decode.prefetch import WeightPrefetcher

log = logging.getLogger(__name__)

# EngineConfig.pdl = "auto": PDL for models at least this wide (measured: 8B's 4096 gains,
# SmolLM2's 576 loses; widths between were not measured)
PDL_MIN_HIDDEN = 2048


def resolve_pdl(setting: str, hidden_size: int) -> bool | None:
    """EngineConfig.pdl -> Backend.pdl: True / False, or None where MINIINFER_PDL decides."""
    if setting != "auto":
        return setting == "on"
    if os.environ.get("MINIINFER_PDL", "").strip():
        return None
    return hidden_size >= PDL_MIN_HIDDEN


# EngineConfig.gemv = "on" (and auto on CUDA): linear layers of at most this many rows take
# kernels/gemv.py. On an H100 (docs/PERF.md, nineteenth session) the GEMV made batch-1 steps
# faster (8B 1.08x with tuned tiles, SmolLM2 1.37x with the norms fused) and batch-4 steps
# slower (8B 0.70-0.90x), so one row
GEMV_ON_ROWS = 1
GEMV_MAX_ROWS = 16  # kernels.gemv.MAX_ROWS (not imported here: importing kernels imports triton)


def resolve_gemv(setting: str, device: torch.device | str | None = None) -> int:
    """EngineConfig.gemv -> Backend.gemv_rows (0: cuBLAS always). auto follows MINIINFER_GEMV
    where it is set, else GEMV_ON_ROWS on CUDA and 0 elsewhere (the interpreter on CPU);
    on = GEMV_ON_ROWS; a number is the most rows sent to the kernel (1 to GEMV_MAX_ROWS).
    Only the Triton backend uses it (on CUDA, or on CPU through Triton's interpreter)."""
    if setting == "auto":
        env = os.environ.get("MINIINFER_GEMV", "").strip().lower()
        if env and env != "auto":
            try:
                return resolve_gemv(env)
            except ValueError as e:
                raise ValueError(f"MINIINFER_GEMV: {e}") from None
        on_gpu = device is not None and torch.device(device).type == "cuda"
        return GEMV_ON_ROWS if on_gpu else 0
    if setting in ("on", "off"):
        return GEMV_ON_ROWS if setting == "on" else 0
    if not setting.isdigit() or not 1 <= int(setting) <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv must be auto, on, off or a row count from 1 to {GEMV_MAX_ROWS}, "
                         f"got {setting!r}")
    return int(setting)


@dataclass(frozen=True)
class EngineConfig:
    kv_dtype: str = "auto"  # auto (= model dtype) | fp32 | bf16 | fp16 | int8
    num_pages: int = 2048  # KV capacity = num_pages * 16 tokens
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's context length
    max_tokens_limit: int = 8192
    attention_backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | torch | triton
    cuda_graphs: bool = True  # on CUDA, replay decode steps from CUDA graphs captured at start
    max_graph_batch_size: int = 256  # largest captured decode batch (capped by max_num_seqs)
    # on CUDA, steps of up to max_prefill_graph_tokens tokens over up to max_prefill_graph_seqs
    # sequences (short prefills, mixed batches) replay from CUDA graphs (prefill/graphs.py)
    prefill_graphs: bool = True
    max_prefill_graph_tokens: int = 512  # capped by max_num_batched_tokens
    max_prefill_graph_seqs: int = 8  # capped by max_num_seqs
    cpu_transposed_weights: bool = True  # on CPU, linear weights kept [in, out] (engine.layers.CPULinear)
    cpu_packed_weights: bool = True  # ... and GGUF-quantized ones also packed (kernels/cpu.py)
    cpu_kernels: bool = True  # on CPU, norms / rotary / activation through kernels/cpu.c (CPUOps)
    # speculative decoding (engine/spec/): off unless spec_drafter is "ngram" or "draft"
    spec_drafter: str = "none"  # none | ngram (prompt lookup) | draft (a small draft model)
    spec_k: int = 4  # tokens drafted and verified per decode step
    spec_draft_model: str | None = None  # draft checkpoint (same tokenizer); None = truncated target
    spec_draft_layers: int = 0  # truncated-target draft: its first N layers (0 = a quarter)
    spec_ngram_max: int = 3  # prompt lookup tries n-grams of this many tokens down to spec_ngram_min
    spec_ngram_min: int = 1
    # decode steps launched one step ahead, fed the step before's tokens on the GPU,
    # so the host's work (results, scheduling, the next launch) overlaps the GPU's:
    # auto (on CUDA) | on | off. Not with speculative decoding or MoE models. On an H100
    # the batch-1 engine loop took 5.7% less time a token on SmolLM2's shape, 1.1% less
    # on the 8B shape (docs/PERF.md, fifteenth session).
    decode_run_ahead: str = "auto"
    # Triton kernels launched with programmatic dependent launch (Hopper+; kernels/_triton.py):
    # on | off | auto. auto follows MINIINFER_PDL where it is set, else PDL for models of
    # hidden size >= PDL_MIN_HIDDEN: on an H100 the 8B shape's batch-1 step took 1.7% less
    # time with it and SmolLM2's (hidden 576) 1.4% more (docs/PERF.md, fifteenth session).
    pdl: str = "auto"
    # captured decode steps prefetch each GEMV's weight into L2 on a side stream while the
    # kernels before it run (decode/prefetch.py): off | auto | bulk:CAP | loads:CAP, CAP
    # the MiB asked for of each weight (or all). auto follows MINIINFER_WEIGHT_PREFETCH
    # where set, else prefetches for models with small layers on Hopper (decode.prefetch.resolve).
    weight_prefetch: str = "auto"
    # linear layers of few rows (decode) through the Triton GEMV (kernels/gemv.py) instead of
    # cuBLAS, with the gated MLP's SiLU-and-mul fused, and for models of hidden size <= 2048
    # each residual add + RMSNorm too (kernels.gemv.fuses_norm): auto | on | off | N (the most
    # rows sent to it, 1-16). auto follows MINIINFER_GEMV where set, else on for CUDA
    # (resolve_gemv; on = 1 row: batch-1 steps were faster, batch-4 slower).
    gemv: str = "auto"

    def __post_init__(self) -> None:
        from engine.spec.drafters import DRAFTERS

        if self.spec_drafter not in DRAFTERS:
            raise ValueError(f"spec_drafter must be one of {DRAFTERS}, got {self.spec_drafter!r}")
        if not 1 <= self.spec_k <= 16:
            raise ValueError(f"spec_k must be in [1, 16], got {self.spec_k}")
        if self.spec_draft_layers < 0:
            raise ValueError(f"spec_draft_layers must be >= 0, got {self.spec_draft_layers}")
        if not 1 <= self.spec_ngram_min <= self.spec_ngram_max:
            raise ValueError(
                f"need 1 <= spec_ngram_min <= spec_ngram_max, got {self.spec_ngram_min}, {self.spec_ngram_max}"
            )
        if self.decode_run_ahead not in ("auto", "on", "off"):
            raise ValueError(f"decode_run_ahead must be auto, on or off, got {self.decode_run_ahead!r}")
        if self.pdl not in ("auto", "on", "off"):
            raise ValueError(f"pdl must be auto, on or off, got {self.pdl!r}")
        if self.gemv != "auto":
            resolve_gemv(self.gemv)  # ValueError with the accepted forms
        if self.weight_prefetch != "auto":
            from decode.prefetch import parse_setting

            parse_setting(self.weight_prefetch)  # ValueError with the accepted forms
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}"
            )
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")
        if self.max_prefill_graph_tokens < 1 or self.max_prefill_graph_seqs < 1:
            raise ValueError("max_prefill_graph_tokens and max_prefill_graph_seqs must be >= 1, got "
                             f"{self.max_prefill_graph_tokens}, {self.max_prefill_graph_seqs}")


@dataclass
class InFlight:
    """A decode step launched but not yet applied: its batch and its tokens."""

    batch: ScheduledBatch
    tokens: PendingTokens


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), device="cpu"):
        self.loaded = loaded
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.device = torch.device(device)
        model_dtype = next(loaded.model.parameters()).dtype
        kv_dtype = resolve_kv_dtype(config.kv_dtype, model_dtype)
        spec = KVCacheSpec(cfg.num_layers, config.num_pages, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
        self.cache = KVCache(spec, self.device)
        self.pool = PagePool(config.num_pages)
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else cfg.eos_token_ids
        self.scheduler = Scheduler(
            self.pool,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            PAGE_SIZE,
            eos,
            num_spec_tokens=0 if config.spec_drafter == "none" else config.spec_k,
        )
        self.backend = select_backend(self.device, config.attention_backend, config.cpu_kernels,
                                      pdl=resolve_pdl(config.pdl, cfg.hidden_size),
                                      gemv_rows=resolve_gemv(config.gemv, self.device))
        if self.device.type == "cpu" and config.cpu_transposed_weights:  # batch-1 decode is GEMVs:
            transpose_linears(loaded.model, pack=config.cpu_packed_weights)  # faster layouts (in place)
        self.runner = ModelRunner(loaded.model, self.cache, self.device, self.backend)
        self.runner.spec = build_spec_decoder(config, loaded.model, self.runner, kv_dtype, self.device,
                                              self.backend)
        self._streams: dict[str, TextStream] = {}
        ahead = config.decode_run_ahead
        self.run_ahead = (ahead == "on" or (ahead == "auto" and self.device.type == "cuda")) and (
            self.runner.spec is None and not cfg.is_moe)  # verify steps; EP's one forward a step
        self._ahead: InFlight | None = None  # the step launched ahead, applied by the next step()
        self.ahead_steps = 0  # steps launched ahead (metrics, tests)
        # Called with (batch, step output) after the model ran, before pages are released:
        # the prefill worker exports finished prompts' KV pages here.
        self.on_executed = None
        self.warmup_seconds = self._warm_up() if self.device.type == "cuda" else 0.0

    def _weight_prefetcher(self) -> WeightPrefetcher | None:
        """EngineConfig.weight_prefetch -> a decode.prefetch.WeightPrefetcher, or None."""
        from decode import prefetch

        chosen = prefetch.resolve(self.config.weight_prefetch, self.runner.model)
        if chosen is None:
            return None
        mode, cap = chosen
        log.info("decode graphs prefetch up to %.0f MiB of each weight into L2 (%s)",
                 min(cap, 1 << 40) / prefetch.MIB, mode)
        return prefetch.WeightPrefetcher(self.runner.model, cap, mode)

    @classmethod
    def from_name(cls, name: str, config: EngineConfig = EngineConfig(), dtype=torch.float32,
                  device="cpu", quiet: bool = False) -> LLMEngine:
        return cls(load_model(name, dtype=dtype, device=device, quiet=quiet), config, device)

    def _warm_up(self) -> float:
        """Compile the kernels and capture the decode graphs before any request. -> seconds."""
        t0 = time.perf_counter()
        if self.backend.name == "triton":
            log.info("warm-up: a prefill, the decode graphs, then throw-away requests")
            self.runner.warmup_prefill()
            if self.config.cuda_graphs and not self.model_config.is_moe:  # MoE: eager (host syncs)
                # The issue puts the graph runner in decode/; imported here, CUDA only.
                from decode.graphs import CudaGraphRunner

                max_bs = min(self.config.max_graph_batch_size, self.config.max_num_seqs)
                graphs = CudaGraphRunner(
                    self.runner.model, self.cache, self.backend, max_bs, self.max_model_len,
                    prefetch=self._weight_prefetcher(),
                )
                graphs.capture()
                self.runner.graphs = graphs
                if self.runner.spec is not None:  # verify graphs per (bucket, k), draft graphs
                    self.runner.spec.capture(self.runner.model, self.cache, self.backend, max_bs,
                                             self.max_model_len)
            if self.config.prefill_graphs and not self.model_config.is_moe:
                from prefill.graphs import PrefillGraphRunner

                c = self.config
                prefill_graphs = PrefillGraphRunner(
                    self.runner.model, self.cache, self.backend,
                    min(c.max_prefill_graph_tokens, c.max_num_batched_tokens),
                    min(c.max_prefill_graph_seqs, c.max_num_seqs), self.max_model_len,
                )
                prefill_graphs.capture()
                self.runner.prefill_graphs = prefill_graphs
            if not self.model_config.is_moe:  # EP ranks step in lockstep: no private requests
                self._warm_requests()
                self._reset_replay_counts()  # metrics count users' steps, not the warm-up's
                self.ahead_steps = 0
        torch.cuda.synchronize(self.device)
        if self.model_config.is_moe:  # the warm-up's made-up tokens are not expert load
            self.runner.model.expert_load(reset=True)
        if self.runner.spec is not None:  # nor are their drafts acceptance figures
            self.runner.spec.metrics = type(self.runner.spec.metrics)()
        seconds = time.perf_counter() - t0
        log.info("warm-up on %s (%s backend, decode graphs %s, prefill graphs %s) took %.2fs",
                 self.device, self.backend.name, self.runner.graphs is not None,
                 self.runner.prefill_graphs is not None, seconds)
        return seconds

    def _warm_requests(self) -> None:
        """Throw-away requests through the whole step path (scheduler, model, sampler,
        detokenizer), so that the first real request's decode steps find nothing left to
        load: torch's CUDA modules load on first use, and Triton compiles a kernel again
        for integer arguments of another kind (1, a multiple of 16, or neither). A prompt
        off the 16-token grid and one long enough for prefill attention's big tiles, each
        alone (one-sequence prefill) and then both in one batch; one greedy, one sampled
        with every filter and logprobs. Their pages go back to the pool.

        With prefill graphs the short prompt replays a captured graph; prompts longer than
        the largest bucket run eagerly, and an eager prefill of a length not run before can
        still be slower the first time (H200: 5-11 ms on an 18-35 ms eager prefill); warming
        a grid of lengths removed that only for the lengths it ran and cost 7-14 s of
        start-up, so it is not done (docs/PERF.md, seventh session)."""
        free = self.pool.num_free
        vocab = self.model_config.vocab_size
        steps = max(1, min(3, self.config.max_tokens_limit))
        fits = (free - 2) * PAGE_SIZE // 2 - steps  # both at once, a page of slack each
        short = min(33, self.max_model_len - 4, fits)
        if short < 1:  # a pool too small to serve two requests at once: skip the warm-up
            log.warning("warm-up: %d free KV pages, too few for the throw-away requests", free)
            return
        long = max(short, min(600, self.max_model_len - 4, fits))
        prompts = [[3 + i % (vocab - 3) for i in range(n)] for n in (short, long)]
        sampled = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0.8, top_k=20,
                                 top_p=0.9, min_p=0.01, seed=0, logprobs=True)
        params = [SamplingParams(max_tokens=steps, ignore_eos=True), sampled]
        for prompt, p in zip(prompts, params):
            self.generate([prompt], p)
        self.generate(prompts, params)
        if self.pool.num_free != free:
            raise RuntimeError(f"warm-up requests leaked {free - self.pool.num_free} KV pages")

    def _reset_replay_counts(self) -> None:
        """Zero the captured-graph replay counters (decode, prefill, spec verify, draft model)."""
        spec = self.runner.spec
        drafter_runner = getattr(getattr(spec, "drafter", None), "runner", None)
        for graphs in (self.runner.graphs, self.runner.prefill_graphs, getattr(spec, "graphs", None),
                       getattr(drafter_runner, "graphs", None)):
            if graphs is not None and hasattr(graphs, "replays"):
                graphs.replays = 0

    # ---- requests ----

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(prompt_token_ids)} tokens; the context length is {self.max_model_len}"
            )
        params.validate(vocab, self.config.max_tokens_limit)
        if len(prompt_token_ids) + 1 > self.pool.num_pages * PAGE_SIZE:
            raise InvalidRequest("prompt does not fit in the KV cache")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        self.validate(prompt_token_ids, params)
        req = Request(list(prompt_token_ids), params, arrival=time.monotonic())
        if request_id is not None:
            req.request_id = request_id
        self.scheduler.add(req)
        if self.tokenizer is not None:
            eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
            self._streams[req.request_id] = TextStream(self.tokenizer, req.prompt_token_ids, params.stop, eos)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def spec_stats(self) -> dict:
        """Speculative decoding counters (acceptance rate, mean accepted length, drafted vs
        accepted tokens); empty when speculation is off."""
        return {} if self.runner.spec is None else self.runner.spec.metrics.as_dict()

    # ---- stepping ----

    def step(self) -> list[RequestOutput]:
        """Run one step and apply its results. With run-ahead, a decode step may
        have been launched by the step before (`_ahead`): it is applied now, and the step
        after it is launched before its tokens are read, fed them on the GPU."""
        current = self._take_ahead()
        if current is None:
            batch = self.scheduler.schedule()
            if batch.is_empty:
                if self.scheduler.waiting and not self.scheduler.running:
                    # Nothing runs and the head of the queue cannot get pages: it never will.
                    req = self.scheduler.waiting[0]
                    self.scheduler.abort(req.request_id)
                    return [RequestOutput(req.request_id, [], True, FinishReason.ABORT)]
                return []
            if not self._can_run_ahead(batch):
                return self._apply(batch, self.runner.execute(batch))
            current = InFlight(batch, self.runner.launch(self.runner.collect(batch)))
        self._launch_ahead(current)
        return self._apply(current.batch, current.tokens.wait())

    def _apply(self, batch: ScheduledBatch, out: StepOutput) -> list[RequestOutput]:
        if self.on_executed is not None:
            self.on_executed(batch, out)
        results = self.scheduler.update(batch, out)  # drops the tokens of finished requests
        for r in results:
            self._detokenize(r)
        return results

    def _take_ahead(self) -> InFlight | None:
        """The step launched ahead, unless every request in it has finished since (a stop
        token, a stop string, an abort): then it is drained and dropped."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and all(s.request.is_finished for s in ahead.batch.seqs):
            ahead.tokens.wait()
            return None
        return ahead

    def _can_run_ahead(self, batch: ScheduledBatch) -> bool:
        """Whether the step after `batch` can be launched before `batch`'s tokens are read:
        `batch` is a decode step of every running request (greedy or sampled; nothing
        waiting that could be admitted instead), some request can still go on after it,
        and none is at the context limit."""
        sched = self.scheduler
        if not self.run_ahead or len(batch.seqs) != len(sched.running):
            return False
        if any(s.request is not r for s, r in zip(batch.seqs, sched.running)):
            return False
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            return False  # admit it next step
        goes_on = False
        for seq in batch.seqs:
            req, p = seq.request, seq.request.params
            if seq.num_new_tokens != 1 or not seq.sample or seq.num_spec_tokens:
                return False
            if req.num_computed_tokens + 1 != req.num_tokens:
                return False
            if req.num_tokens + 1 > self.max_model_len:
                return False
            goes_on |= len(req.output_token_ids) + 1 < p.max_tokens and req.num_tokens + 1 < self.max_model_len
        return goes_on

    def _launch_ahead(self, current: InFlight) -> None:
        """Launch the step after `current` (same requests, one token further), fed
        `current`'s tokens on the GPU, if allowed and its pages can be reserved."""
        batch = current.batch
        if not self._can_run_ahead(batch):
            return
        for seq in batch.seqs:  # the next step writes position num_computed_tokens + 1
            if not self.scheduler.reserve(seq.request, seq.request.num_computed_tokens + 2):
                return  # short of pages: the next step is scheduled (and may preempt)
        nxt = ScheduledBatch([ScheduledSeq(s.request, 1, True) for s in batch.seqs])
        tokens = self.runner.launch(self.runner.collect_next(batch), ids=current.tokens.device)
        self._ahead = InFlight(nxt, tokens)
        self.ahead_steps += 1

    def _detokenize(self, r: RequestOutput) -> None:
        stream = self._streams.get(r.request_id)
        if stream is None:
            return
        r.text = stream.push(r.new_token_ids, r.finished)
        if stream.stopped and not r.finished:
            self.scheduler.finish(r.request_id, FinishReason.STOP)
            r.finished, r.finish_reason = True, FinishReason.STOP
        if r.finished:
            self._streams.pop(r.request_id, None)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run prompts as one continuous batch to completion; results in input order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[str, Completion] = {
            rid: Completion(rid, list(p), [], "", "") for rid, p in zip(ids, prompts)
        }
        logprobs: dict[str, list[float]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for r in self.step():
                c = done[r.request_id]
                c.token_ids.extend(r.new_token_ids)
                c.text += r.text
                if r.new_logprobs:
                    logprobs[r.request_id].extend(r.new_logprobs)
                if r.finished:
                    c.finish_reason = r.finish_reason.value
        for rid, c in done.items():
            c.logprobs = logprobs[rid] if plist[ids.index(rid)].logprobs else None
        return [done[rid] for rid in ids]
