"""GenerateRequest -> (prompt token ids, SamplingParams), or InvalidRequest naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import InvalidRequest
from engine.sampling import SamplingParams
from engine.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_prompt_chars: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_messages: int = 256
    max_request_id_chars: int = 128


ROLES = ("system", "user", "assistant")


def check_request_id(rid: str, limits: Limits) -> None:
    if len(rid) > limits.max_request_id_chars:
        raise InvalidRequest(f"request_id: longer than {limits.max_request_id_chars} characters")
    if not rid.isprintable() or "#" in rid:
        raise InvalidRequest("request_id: printable characters only, and no '#'")


def sampling_from_pb(sp, limits: Limits) -> SamplingParams:
    def opt(name, default):
        return getattr(sp, name) if sp.HasField(name) else default

    temperature = opt("temperature", 1.0)
    top_p = opt("top_p", 1.0)
    min_p = opt("min_p", 0.0)
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if math.isnan(v) or math.isinf(v):
            raise InvalidRequest(f"sampling.{name} must be finite, got {v}")
    if len(sp.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"sampling.stop: at most {limits.max_stop_strings} stop strings, got {len(sp.stop)}")
    for s in sp.stop:
        if not s or len(s) > limits.max_stop_string_chars:
            raise InvalidRequest(f"sampling.stop: each stop string must be 1..{limits.max_stop_string_chars} characters")
    if len(sp.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequest(f"sampling.stop_token_ids: at most {limits.max_stop_token_ids} ids")
    params = SamplingParams(
        max_tokens=opt("max_tokens", limits.default_max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=opt("top_k", 0),
        min_p=float(min_p),
        seed=opt("seed", None),
        stop=tuple(sp.stop),
        stop_token_ids=tuple(int(t) for t in sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
    )
    try:
        params.validate(limits.vocab_size, limits.max_tokens)
    except InvalidRequest as e:
        raise InvalidRequest(f"sampling.{e}") from None
    return params


def prompt_ids_from_pb(req, tokenizer: TextTokenizer, limits: Limits) -> list[int]:
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input: set one of prompt, messages or token_ids")
    if kind == "prompt":
        if not req.prompt:
            raise InvalidRequest("prompt: is empty")
        if len(req.prompt) > limits.max_prompt_chars:
            raise InvalidRequest(f"prompt: longer than {limits.max_prompt_chars} characters")
        ids = tokenizer.encode(req.prompt)
    elif kind == "messages":
        msgs = [{"role": m.role, "content": m.content} for m in req.messages.messages]
        if not msgs:
            raise InvalidRequest("messages: is empty")
        if len(msgs) > limits.max_messages:
            raise InvalidRequest(f"messages: at most {limits.max_messages} messages")
        bad_role = next((m["role"] for m in msgs if m["role"] not in ROLES), None)
        if bad_role is not None:
            raise InvalidRequest(f"messages.role: {bad_role[:32]!r} is not one of {', '.join(ROLES)}")
        if sum(len(m["content"]) for m in msgs) > limits.max_prompt_chars:
            raise InvalidRequest(f"messages: longer than {limits.max_prompt_chars} characters")
        ids = tokenizer.encode(tokenizer.apply_chat_template(msgs))
    else:
        ids = list(req.token_ids.ids)
        bad = next((t for t in ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token_ids: {bad} is not a token id of this model (vocab {limits.vocab_size})")
    if not ids:
        raise InvalidRequest(f"{kind}: is empty after tokenization")
    cap = min(limits.max_prompt_tokens, limits.max_model_len - 1)
    if len(ids) > cap:
        raise InvalidRequest(f"{kind}: {len(ids)} tokens is over the limit of {cap} (context length {limits.max_model_len})")
    return ids
