"""Prefill worker: batches prompts, samples the first token, hands KV to a decode worker."""
