"""Cluster subcommands (up, down, status, apply). Filled in by the cluster work."""

from __future__ import annotations


def add_cluster_commands(sub) -> None:
    pass
