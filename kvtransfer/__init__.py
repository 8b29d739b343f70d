"""Moving a prompt's KV pages from a prefill worker to a decode worker.

layout.py holds the contract (header, payload, validation); transports move bytes.
"""
