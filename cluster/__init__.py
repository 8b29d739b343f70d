"""Cluster: config, Ray bootstrap, the controller that creates worker pools, and the CLI."""
