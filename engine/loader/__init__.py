"""Weight loaders: GGUF (the bundled SmolLM2) and local HF directories (safetensors)."""
