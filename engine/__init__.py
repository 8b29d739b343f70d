"""Model-execution core shared by prefill and decode workers.

Imports neither ray nor grpc: everything here runs in one process, on CPU or GPU.
"""
