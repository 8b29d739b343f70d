"""`miniinfer` command line: generate (local engine or cluster client), up, down, status, apply."""

from __future__ import annotations

import argparse
import json
import math
import sys

from cluster.errors import EXIT_USAGE, CLIError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"miniinfer: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text (local engine with --local, else the cluster)")
    g.add_argument("prompt", nargs="?", help="prompt text (or use --prompts-file)")
    g.add_argument("--local", action="store_true", help="run the engine in this process, no cluster")
    g.add_argument("--address", default="127.0.0.1:50051", help="router address (cluster mode)")
    g.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a HF directory")
    g.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    g.add_argument("--max-tokens", type=_positive_int, default=64)
    g.add_argument("--temperature", type=_finite_float, default=0.0)
    g.add_argument("--top-p", type=_finite_float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=_finite_float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    g.add_argument("--prompts-file", help="JSONL file, one {\"prompt\": ...} per line")
    g.add_argument("--timeout", type=_finite_float, default=300.0, help="per-request deadline (s)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="miniinfer", description="MiniInfer: disaggregated LLM serving")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    from cluster import commands

    commands.add_cluster_commands(sub)
    from cluster import loadgen

    loadgen.add_bench_command(sub)
    return p


def read_prompts(args) -> list[str]:
    if args.prompts_file and args.prompt:
        raise CLIError("give either PROMPT or --prompts-file, not both")
    if not args.prompts_file:
        if args.prompt is None:
            raise CLIError("no prompt: give PROMPT or --prompts-file")
        return [args.prompt]
    try:
        lines = open(args.prompts_file, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read --prompts-file {args.prompts_file}: {e}") from e
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{args.prompts_file}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise CLIError(f"{args.prompts_file}:{n}: expected an object with a string \"prompt\"")
        prompts.append(obj["prompt"])
    if not prompts:
        raise CLIError(f"{args.prompts_file}: no prompts")
    return prompts


def sampling_from_args(args):
    from engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def run_local(args) -> int:
    from engine.errors import InvalidRequest
    from engine.llm import EngineConfig, LLMEngine

    prompts = read_prompts(args)
    params = sampling_from_args(args)
    try:
        params.validate()
    except InvalidRequest as e:
        raise CLIError(str(e)) from e
    engine = LLMEngine.from_name(args.model, EngineConfig(kv_dtype=args.kv_dtype))
    tok = engine.tokenizer
    if tok is None:
        raise CLIError(f"model {args.model} has no tokenizer.json; cannot take text prompts")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in prompts]
    try:
        ids = [tok.encode(t) for t in texts]
        if len(ids) == 1 and not args.json:
            return _stream_one(engine, ids[0], params)
        outs = engine.generate(ids, params)
    except InvalidRequest as e:
        raise CLIError(str(e)) from e
    for prompt, o in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_token_ids": o.prompt_token_ids,
                              "token_ids": o.token_ids, "text": o.text,
                              "finish_reason": o.finish_reason}, ensure_ascii=False), flush=True)
        else:
            print(o.text, flush=True)
    return 0


def _stream_one(engine, ids: list[int], params) -> int:
    engine.add_request(ids, params)
    while engine.has_unfinished():
        for r in engine.step():
            sys.stdout.write(r.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.errors import MiniInferError

    try:
        if args.command == "generate":
            if args.local:
                return run_local(args)
            from cluster.client import run_remote

            return run_remote(args)
        return args.func(args)
    except (CLIError, MiniInferError) as e:
        print(f"miniinfer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("miniinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
