"""Serving many adapters on one base model: the engine (continuous batching over token ids, adapters
in fixed slots) and, on top of it, the OpenAI-compatible HTTP server (`peftkit serve`)."""
