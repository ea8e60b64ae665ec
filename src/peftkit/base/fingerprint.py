"""A short, stable identity of a base model: sha256 over its config and its weights.

Adapters record the fingerprint of the base they were trained on, so loading one into a different
base can be refused. Two loads of the same checkpoint must agree whatever their dtype or device,
so the config is reduced to the keys that change the function the model computes, and every
floating-point tensor is hashed after rounding to bfloat16 (float32 and bfloat16 loads then agree).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from peftkit.errors import BaseModelError

FINGERPRINT_PREFIX = "sha256:"
_FORMAT_TAG = b"peftkit-base-fingerprint-v1"

# Config keys that do not change what the model computes in eval mode: bookkeeping, output
# switches, precision and kernel choices, init-only and training-only settings, label maps for
# heads a causal LM does not have, and generation defaults (these live in generation_config).
_VOLATILE_KEYS = frozenset(
    {
        "dtype",
        "torch_dtype",
        "name_or_path",
        "transformers_version",
        "quantization_config",
        "architectures",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "gradient_checkpointing",
        "chunk_size_feed_forward",  # chunks the same computation to save memory
        "pretraining_tp",  # tensor-parallel slicing of the same matmul
        "initializer_range",
        "initializer_factor",
        "init_std",
        "router_aux_loss_coef",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        # generation defaults that older configs carry at the top level
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)


def _is_volatile(key: str) -> bool:
    # Leading "_" marks transformers' private state (_name_or_path, _attn_implementation, ...).
    # Token ids only matter to tokenizers and generate(); dropout is off in eval mode.
    return (
        key in _VOLATILE_KEYS
        or key.startswith("_")
        or key.endswith("_token_id")
        or "dropout" in key
        or key.endswith("_pdrop")
        or key == "layerdrop"
    )


def canonical_config(value: Any) -> Any:
    """`value` (a config dict, possibly nested) with volatile keys dropped and numbers normalised."""
    if isinstance(value, dict):
        return {str(k): canonical_config(v) for k, v in value.items() if not _is_volatile(str(k))}
    if isinstance(value, list | tuple):
        return [canonical_config(v) for v in value]
    # 10000 and 10000.0 are the same rope_theta; without this a config rewritten by another
    # tool would change the fingerprint of identical weights.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _config_bytes(config: dict[str, Any] | None) -> bytes:
    if config is None:
        return b"null"
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"), default=str)
    return text.encode()


def _tensor_bytes(name: str, tensor: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """A header naming the value kind, and the tensor as flat CPU bytes (bf16 for floats)."""
    tensor = tensor.detach()
    if tensor.is_meta:
        raise BaseModelError(
            f"cannot fingerprint {name!r}: it is a meta tensor with no data; load real weights"
        )
    if tensor.is_floating_point():
        # Round on the tensor's own device (cheaper to move), then bring the bytes to the CPU.
        tensor, kind = tensor.to(dtype=torch.bfloat16), "float"
    else:
        kind = str(tensor.dtype)
    flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,)
    return kind.encode(), flat


def _update_framed(h: Any, data: bytes | memoryview) -> None:
    # Length-prefixing makes the byte stream unambiguous: no two inputs frame to the same bytes.
    h.update(len(data).to_bytes(8, "little"))  # len of a 1-D uint8 view is its byte count
    h.update(data)


def fingerprint_tensors(
    config: dict[str, Any] | None, named_tensors: Iterable[tuple[str, torch.Tensor]]
) -> str:
    """Fingerprint of a model given its config dict and its (name, tensor) pairs.

    Pass the plain base model's state as `model.state_dict().items()` would: every name once,
    tied weights under each of their names. Order does not matter (names are sorted); dtype and
    device do not matter for floating-point tensors (they are hashed as bfloat16).
    Returns `"sha256:" + 64 hex chars`.
    """
    h = hashlib.sha256()
    _update_framed(h, _FORMAT_TAG)
    _update_framed(h, _config_bytes(config))
    seen: set[str] = set()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        if name in seen:
            raise BaseModelError(f"cannot fingerprint: tensor name {name!r} appears twice")
        seen.add(name)
        kind, flat = _tensor_bytes(name, tensor)
        _update_framed(h, name.encode())
        _update_framed(h, kind)
        _update_framed(h, json.dumps(list(tensor.shape)).encode())
        _update_framed(h, memoryview(flat.numpy()))
    return FINGERPRINT_PREFIX + h.hexdigest()


def model_fingerprint(model: nn.Module, *, refresh: bool = False) -> str:
    """Fingerprint of a plain transformers model, cached in its `BaseFacts` (`peftkit.base.facts`).

    The cached value is returned as is on later calls (and is what `load_base` sets from its
    sidecar file); pass `refresh=True` after changing the weights in place.
    """
    from peftkit.base.facts import base_facts

    cached = base_facts(model).fingerprint
    if isinstance(cached, str) and not refresh:
        return cached
    config = model.config.to_dict() if hasattr(model, "config") else None
    fingerprint = fingerprint_tensors(config, model.state_dict().items())
    base_facts(model).fingerprint = fingerprint
    return fingerprint


def short_fingerprint(fingerprint: str) -> str:
    """The first 12 hex chars of a fingerprint, for display."""
    if not is_fingerprint(fingerprint):
        raise BaseModelError(f"{fingerprint!r} is not a base-model fingerprint ('sha256:' + 64 hex chars)")
    return fingerprint[len(FINGERPRINT_PREFIX) :][:12]


def is_fingerprint(value: object) -> bool:
    """True when `value` has the fingerprint format: `"sha256:"` then 64 lowercase hex chars."""
    if not isinstance(value, str) or not value.startswith(FINGERPRINT_PREFIX):
        return False
    digest = value[len(FINGERPRINT_PREFIX) :]
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
