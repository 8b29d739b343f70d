"""Decode worker: receives prompts' KV pages and runs the continuous-batching decode loop."""
