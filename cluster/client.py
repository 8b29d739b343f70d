"""gRPC client side of `miniinfer generate` (cluster mode)."""

from __future__ import annotations


def run_remote(args) -> int:
    from cluster.cli import CLIError

    raise CLIError("cluster mode is not available yet; use --local")
