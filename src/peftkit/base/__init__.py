"""Base models: loading them (built-in, GGUF, HF directory, hub), saving them, and fingerprinting them."""

from peftkit.base.cache import default_cache_dir
from peftkit.base.catalog import BUILTIN_MODELS, DEFAULT_BASE
from peftkit.base.fingerprint import (
    fingerprint_tensors,
    is_fingerprint,
    model_fingerprint,
    short_fingerprint,
)
from peftkit.base.load import load_base, resolve_dtype
from peftkit.base.save import save_model_dir

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_BASE",
    "default_cache_dir",
    "fingerprint_tensors",
    "is_fingerprint",
    "load_base",
    "model_fingerprint",
    "resolve_dtype",
    "save_model_dir",
    "short_fingerprint",
]
