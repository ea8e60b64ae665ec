"""What peftkit knows of a base model it loaded: one typed value (`BaseFacts`), kept on the model under
one public attribute, `peftkit_base`, and read by the adapted model (`AdaptedModel.base`).

    model, tokenizer = load_base("smollm2-135m")
    base_facts(model).name, base_facts(model).fingerprint   # "smollm2-135m", "sha256:..."
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTRIBUTE = "peftkit_base"  # the attribute `load_base` sets on the model it returns


@dataclass
class BaseFacts:
    """A loaded base model's identity. Mutable on purpose: the fingerprint is cached once computed and
    dropped when a merge changes the weights; quantization is dropped when the model is dequantized."""

    name: str | None = None  # what was given to load_base (a built-in name, a path, a hub id)
    quantization: str | None = None  # "nf4" for a 4-bit base, else None
    stored_dtype: Any = None  # the torch dtype of the checkpoint's files, whatever it was loaded in
    fingerprint: str | None = None  # the weights' identity (`model_fingerprint`), once known


def base_facts(model: Any) -> BaseFacts:
    """The facts recorded on `model`; for a model loaded elsewhere, empty facts, kept on it from now on
    (so a fingerprint computed once is cached)."""
    facts = vars(model).get(ATTRIBUTE)
    if not isinstance(facts, BaseFacts):
        facts = BaseFacts()
        setattr(model, ATTRIBUTE, facts)
    return facts
