"""prefill."""
