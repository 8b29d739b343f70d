"""gRPC front door: validation, tokenization, P/D choice, output fan-out, cancellation."""
