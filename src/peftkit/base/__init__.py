"""Base models: loading them (built-in, GGUF, HF directory, hub), saving them, fingerprinting them, and
storing their linear layers in 4-bit NF4."""

from peftkit.base.cache import default_cache_dir
from peftkit.base.catalog import BUILTIN_MODELS, DEFAULT_BASE
from peftkit.base.fingerprint import (
    fingerprint_tensors,
    is_fingerprint,
    model_fingerprint,
    short_fingerprint,
)
from peftkit.base.load import QUANTIZATIONS, load_base
from peftkit.base.nf4 import NF4Linear, NF4Weight, dequantize_nf4, quantize_model, quantize_nf4
from peftkit.base.precision import auto_dtype, compute_dtype
from peftkit.base.save import save_model_dir

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_BASE",
    "NF4Linear",
    "NF4Weight",
    "QUANTIZATIONS",
    "auto_dtype",
    "compute_dtype",
    "default_cache_dir",
    "dequantize_nf4",
    "fingerprint_tensors",
    "is_fingerprint",
    "load_base",
    "model_fingerprint",
    "quantize_model",
    "quantize_nf4",
    "save_model_dir",
    "short_fingerprint",
]
