"""gRPC client side of `miniinfer generate` (cluster mode), also usable from Python."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import grpc

from protos.miniinfer.v1 import miniinfer_pb2 as pb
from protos.miniinfer.v1 import miniinfer_pb2_grpc as pb_grpc


def build_request(prompt: str | None = None, *, messages: list[dict] | None = None,
                  token_ids: list[int] | None = None, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  min_p: float | None = None, seed: int | None = None, stop=(), ignore_eos: bool = False,
                  logprobs: bool = False, request_id: str = "", model: str = "") -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, model=model)
    if messages is not None:
        req.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.prompt = prompt or ""
    sp = req.sampling
    for name, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                    ("top_k", top_k), ("min_p", min_p), ("seed", seed)):
        if v is not None:
            setattr(sp, name, v)
    sp.stop.extend(stop)
    sp.ignore_eos, sp.logprobs = ignore_eos, logprobs
    return req


def credentials(token: str | None = None, tls_ca: str | None = None):
    """-> (call metadata or None, channel credentials or None) for the router's api_token and
    TLS CA file; each defaults to $MINIINFER_API_TOKEN / $MINIINFER_TLS_CA."""
    token = os.environ.get("MINIINFER_API_TOKEN", "") if token is None else token
    tls_ca = tls_ca or os.environ.get("MINIINFER_TLS_CA") or None
    creds = None
    if tls_ca is not None:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return ((("authorization", f"Bearer {token}"),) if token else None), creds


class Client:
    """Blocking client: `for msg in Client(addr).generate(build_request("Hi")): ...`

    token: the router's api_token (default: $MINIINFER_API_TOKEN), sent as a bearer token;
    tls_ca: PEM file to trust when the router serves TLS (default: $MINIINFER_TLS_CA)."""

    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None, tls_ca: str | None = None) -> None:
        self.metadata, creds = credentials(token, tls_ca)
        self.channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
        self.stub = pb_grpc.MiniInferStub(self.channel)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = 300.0) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def status(self, timeout: float = 10.0) -> pb.ClusterStatus:
        return self.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


def run_remote(args) -> int:
    from cluster.cli import read_prompts, sampling_from_args
    from cluster.errors import CLIError

    prompts = read_prompts(args)
    sampling_from_args(args).validate()  # same checks as the server, before any traffic
    client = Client(args.address)
    try:
        for prompt in prompts:
            kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop)
            if args.model != "smollm2-135m":
                kw["model"] = args.model
            req = (build_request(messages=[{"role": "user", "content": prompt}], **kw) if args.chat
                   else build_request(prompt, **kw))
            ids, text, reason = [], [], "none"
            try:
                for msg in client.generate(req, timeout=args.timeout):
                    ids.extend(msg.token_ids)
                    text.append(msg.text)
                    if not args.json:
                        sys.stdout.write(msg.text)
                        sys.stdout.flush()
                    if msg.finish_reason:
                        reason = FINISH_NAMES[msg.finish_reason]
            except grpc.RpcError as e:
                raise CLIError(f"{e.code().name}: {e.details()}") from None
            if args.json:
                print(json.dumps({"prompt": prompt, "token_ids": ids, "text": "".join(text),
                                  "finish_reason": reason}, ensure_ascii=False), flush=True)
            else:
                sys.stdout.write("\n")
    finally:
        client.close()
    return 0
