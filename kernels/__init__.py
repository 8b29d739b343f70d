"""Triton kernels for the GPU fast path, each registered as a `torch.ops.miniinfer.*` op.

One file per kernel (rmsnorm, rotary, activation, kv_store, decode_attention,
prefill_attention): the @triton.jit kernel, a wrapper that validates its inputs, and a
plain-torch reference. `import kernels.ops` registers them all. Importing works without
Triton installed; calling a kernel then raises TritonUnavailableError. See README.md.
"""
