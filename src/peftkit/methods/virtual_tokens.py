"""What the two virtual-token methods, prompt tuning and prefix tuning, share: their config's geometry
fields and checks (the model an adapter was made for), reading and writing their part of
adapter_config.json, the model's embedding table and dtype, and the `peftkit info` geometry line.

Both are whole-model methods (`ModelAdapter`s): P virtual tokens whose keys and values every real
token attends to first (`peftkit.core.kv_prefix`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.layer_types import unwrap
from ..errors import ConfigError
from .config_fields import check, config_field, config_from_fields, file_fields, is_int

GEOMETRY = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


# -- the config ------------------------------------------------------
def geometry_field(what: str) -> Any:
    return config_field(
        None, f"filled from the base model when the adapter is made ({what}); a file's value must match it"
    )


def check_common(config: Any) -> None:
    """The checks every virtual-token config shares: the prompt's length and the geometry fields."""
    n = config.num_virtual_tokens
    check(is_int(n) and n > 0, "num_virtual_tokens", n, "a positive integer, e.g. 20")
    for key in GEOMETRY:
        value = getattr(config, key)
        check(
            value is None or (is_int(value) and value > 0),
            key,
            value,
            "a positive integer, or null (from the model)",
        )


def check_geometry(config: Any, found: dict[str, int], model: nn.Module, label: str, error: type) -> None:
    """Each geometry field the config sets must be the model's: else `error` naming field and fix."""
    for key, value in found.items():
        given = getattr(config, key)
        if given is not None and given != value:
            raise error(
                f"the {label} adapter has {key}={given}, but this base model ({type(model).__name__}) has "
                f"{key}={value}: it was made for another base model. Use the base model it was made for"
                + (" (or leave the field unset: it is filled from the model)" if error is ConfigError else "")
            )


def from_file(
    cls: type, data: dict[str, Any], source: Any, label: str, ignored: set[str], changes: dict[str, Any]
) -> Any:
    """A config from the method part of an adapter_config.json (peftkit's or HF PEFT's). Keys in
    `ignored` only chose starting values (the file's tensors replace them); `changes` are applied."""
    ours = file_fields(cls, data, source, ignored, adapter=f"{label} adapter")
    return config_from_fields(cls, {**ours, **changes}, source)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (its token embeddings'): prompts and prefixes are cast to it."""
    return input_embeddings(model).weight.dtype


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's own token-embedding table, seen through any adapter that wraps it (a LoRA on
    embed_tokens must not leak into a soft prompt's starting values)."""
    return unwrap(model.get_input_embeddings())


def file_geometry(token_dim: int, layers: int, heads: int) -> dict[str, int]:
    """The geometry fields of a file for a decoder-only model (one transformer submodule); which width
    and heads they count differs between the methods, as in HF PEFT."""
    return {
        "token_dim": token_dim,
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_transformer_submodules": 1,
    }


# -- the file ------------------------------------------------------------------------------------------
def config_to_file(config: Any, geometry: dict[str, int] | None, unset: dict[str, None]) -> dict[str, Any]:
    """The method's part of adapter_config.json: its fields, HF PEFT's keys peftkit has no use for
    (`unset`, and modules_to_save) as null, and the model's geometry when the adapter is given (HF PEFT
    fills geometry left null from the model it loads into)."""
    data = {**config.to_dict(), **unset, "modules_to_save": None}
    if geometry is not None:
        data.update(geometry)
    return data


def geometry_rows(f: dict[str, Any], heads: str = "attention heads") -> list[tuple[str, str]]:
    """The model the file says it was made for (when it says: HF PEFT's files do, peftkit's may not)."""
    if not f.get("num_layers"):
        return []
    return [("made for", f"{f['num_layers']} layers, {f['num_attention_heads']} {heads}")]


# What every virtual-token method's spec says alike: nothing to merge, rows of a batch may differ, a
# new adapter already changes the outputs (its tokens take a share of every attention softmax), and
# transformers drops the cache of checkpointed layers while training (tests/test_prompt_prefix.py).
SPEC_FLAGS: dict[str, Any] = {
    "supports_merge": False,
    "supports_mixed_batch": True,
    "starts_unchanged": False,
    "supports_gradient_checkpointing": False,
}
