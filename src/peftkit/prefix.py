"""Whole-model adapters as key/value prefixes: the one place that feeds them to the base model.

Prefix tuning learns the keys and values of P virtual tokens in every attention layer; prompt tuning
learns P soft input embeddings, whose keys and values are those the model computes for them at
positions 0..P-1. Either way, what reaches the model is a per-layer (key, value) prefix: the real
tokens attend to it, start at position P, and the logits cover the real tokens only.

The prefix goes in through transformers' public cache API (`DynamicCache(ddp_cache_data=...)`, the
forward's `cache` argument, `get_seq_length`), never its private layout; tests pin that behaviour.
Rows of one batch may carry different prefixes (or none): shorter ones are masked out on the left.

    kwargs = prefix_inputs(model, kwargs, rows)            # forward: cache, mask, positions
    out = generate_with_prefix(model, rows, **kwargs)      # generate: the same, then strip the prefix
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RequestError

KV = list[tuple[Tensor, Tensor]]  # per layer: key and value (H_kv, P, D) of one prefix


def prefix_inputs(model: nn.Module, kwargs: dict[str, Any], rows: list[KV | None]) -> dict[str, Any]:
    """The base model's keyword arguments with each row's prefix (None: no prefix) in front."""
    ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    main = ids if ids is not None else embeds
    if main is None:
        raise RequestError("a prompt or prefix adapter needs input_ids or inputs_embeds")
    if _cache_given(kwargs):
        raise RequestError(
            "a prompt or prefix adapter brings its own key/value cache; do not pass one (cache / "
            "past_key_values) to a model whose active adapter is one"
        )
    batch, length = main.shape[0], main.shape[1]
    if len(rows) != batch:
        raise RequestError(f"{len(rows)} prefixes for a batch of {batch} rows")
    cache, prefix_mask = build_cache(rows, main.device)
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=main.device) if mask is None else mask
    full = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)  # (B, P + T)
    out = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
    out["attention_mask"] = full
    if out.get("position_ids") is None:
        # Padding-aware positions, as generate computes them: a row's real tokens start after its
        # own prefix (P_row), whatever the longest prefix in the batch.
        out["position_ids"] = (full.cumsum(-1) - 1).clamp(min=0)[:, -length:]
    out[cache_argument(model)] = cache
    out["use_cache"] = True
    return out


def build_cache(rows: list[KV | None], device: torch.device) -> tuple[Any, Tensor]:
    """A DynamicCache holding each row's prefix, right-aligned in P = the longest prefix's length, and
    the (B, P) mask of the slots that hold one."""
    from transformers import DynamicCache

    template = next((r for r in rows if r is not None), None)
    if template is None:
        raise RequestError("no row of the batch has a prefix")
    p_max = max(r[0][0].shape[1] for r in rows if r is not None)
    mask = torch.zeros(len(rows), p_max, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r is not None:
            mask[i, p_max - r[0][0].shape[1] :] = 1
    layers = []
    for layer, (k0, v0) in enumerate(template):
        keys = torch.stack([_padded(r[layer][0] if r else None, k0, p_max) for r in rows])  # (B, H, P, D)
        values = torch.stack([_padded(r[layer][1] if r else None, v0, p_max) for r in rows])
        layers.append((keys.to(device), values.to(device)))
    return DynamicCache(ddp_cache_data=layers), mask


def _padded(t: Tensor | None, like: Tensor, p_max: int) -> Tensor:
    """One row's (H, P_row, D) prefix zero-padded on the left to (H, p_max, D); zeros for no prefix."""
    if t is None:
        return like.new_zeros(like.shape[0], p_max, like.shape[2])
    if t.shape[1] == p_max:
        return t
    return torch.cat([t.new_zeros(t.shape[0], p_max - t.shape[1], t.shape[2]), t], dim=1)


def generate_with_prefix(model: nn.Module, rows: list[KV | None], **kwargs: Any) -> Tensor:
    """`model.generate` with each row's prefix: the prefix is the cache generate starts from, the
    prompt ids get P placeholder ids in front (generate skips the positions its cache holds), and the
    placeholders are cut from the returned sequences."""
    ids = kwargs.pop("input_ids", None)
    if ids is None:
        ids = kwargs.pop("inputs", None)
    if ids is None:
        raise RequestError("generating with a prompt or prefix adapter needs input_ids")
    inputs = prefix_inputs(model, {**kwargs, "input_ids": ids}, rows)
    p_max = inputs["attention_mask"].shape[1] - ids.shape[1]
    placeholder = torch.zeros(ids.shape[0], p_max, dtype=ids.dtype, device=ids.device)
    inputs["input_ids"] = torch.cat([placeholder, ids], dim=1)  # (B, P + T)
    inputs.pop("position_ids")  # generate derives them from the mask, the same way
    inputs.pop("use_cache")
    out = model.generate(**inputs)
    if isinstance(out, Tensor):
        return out[:, p_max:]
    out.sequences = out.sequences[:, p_max:]
    return out


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the key/value cache: `cache` since transformers 5.x, else the old one."""
    return _cache_argument(type(model))


@functools.cache
def _cache_argument(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_given(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))


def model_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's attention, from its config."""
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    config = get() if callable(get) else config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise RequestError(
            f"cannot read the attention layout of {type(model).__name__} (num_hidden_layers, "
            "num_attention_heads, hidden_size); prompt and prefix tuning need a decoder language model"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim
