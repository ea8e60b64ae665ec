"""Whole-model adapters as key/value prefixes: the one place that feeds them to the base model.

Prefix tuning learns the keys and values of P virtual tokens in every attention layer; prompt tuning
learns P soft input embeddings, whose keys and values are those the model computes for them at
positions 0..P-1. Either way, what reaches the model is a per-layer (key, value) prefix: the real
tokens attend to it, start at position P, and the logits cover the real tokens only.

The prefix goes in through transformers' public cache API (`DynamicCache(ddp_cache_data=...)`, the
forward's `cache` argument, `get_seq_length`), never its private layout; tests pin that behaviour.
Rows of one batch may carry different prefixes (or none): shorter ones are masked out on the left.

Positions are padding-aware, as `generate` computes them (cumsum of the mask - 1): a row's first real
token sits at position P_row whatever padding comes before it. HF PEFT's forward uses arange(T) + P
instead, which agrees for unpadded and right-padded rows and differs for left-padded ones; ours makes
the forward and generation agree with each other.

    kwargs = prefix_inputs(model, kwargs, rows)            # forward: cache, mask, positions
    out = generate_with_prefix(model, rows, **kwargs)      # generate: the same, then strip the prefix
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import AdapterStateError, RequestError, TargetError
from .rows import AdapterState, generate_expansion

KV = list[tuple[Tensor, Tensor]]  # per layer: key and value (H_kv, P, D) of one prefix


def prefix_inputs(model: nn.Module, kwargs: dict[str, Any], rows: list[KV | None]) -> dict[str, Any]:
    """The base model's keyword arguments with each row's prefix (None: no prefix) in front."""
    main = _main_input(kwargs)
    if _cache_given(kwargs):
        raise RequestError(
            "a prompt or prefix adapter brings its own key/value cache; do not pass one (cache / "
            "past_key_values) to a model whose active adapter is one"
        )
    check_no_checkpointing(model)
    batch = main.shape[0]
    if len(rows) != batch:
        raise RequestError(f"{len(rows)} prefixes for a batch of {batch} rows")
    out = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
    cache, prefix_mask = build_cache(rows, main.device)
    out.update(_mask_and_positions(kwargs, main, prefix_mask))
    out[cache_argument(model)] = cache
    out["use_cache"] = True
    return out


def _main_input(kwargs: dict[str, Any]) -> Tensor:
    ids = kwargs.get("input_ids")
    main = ids if ids is not None else kwargs.get("inputs_embeds")
    if main is None:
        raise RequestError("a prompt or prefix adapter needs input_ids or inputs_embeds")
    return main


def _mask_and_positions(kwargs: dict[str, Any], main: Tensor, prefix_mask: Tensor) -> dict[str, Tensor]:
    """The (B, P + T) attention mask and the real tokens' (B, T) positions, each row's shifted past its
    own prefix (P_row, the ones in its part of `prefix_mask`)."""
    batch, length = main.shape[0], main.shape[1]
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=main.device) if mask is None else mask
    full = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)  # (B, P + T)
    given = kwargs.get("position_ids")
    if given is not None:  # the caller's positions, moved past each row's prefix (as HF PEFT does)
        positions = given + prefix_mask.sum(-1, keepdim=True).to(given.dtype)  # (B, T)
    else:  # padding-aware, as generate computes them (see the module docstring)
        positions = (full.cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, T)
    return {"attention_mask": full, "position_ids": positions}


def build_cache(rows: list[KV | None], device: torch.device) -> tuple[Any, Tensor]:
    """A DynamicCache holding each row's prefix, right-aligned in P = the longest prefix's length, and
    the (B, P) mask of the slots that hold one. A fresh cache each call: the model appends to it."""
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


def generate_with_prefix(model: nn.Module, rows: list[KV | None], **kwargs: Any) -> Any:
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
    expand = generate_expansion(model, kwargs)
    if expand > 1:
        # generate repeats each row's inputs for its beams (or returned sequences) but not the cache
        # it is given, so the cache holds each row's prefix that many times already.
        inputs[cache_argument(model)] = build_cache([r for r in rows for _ in range(expand)], ids.device)[0]
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
    name = _cache_argument(type(model))
    if name is None:
        raise _no_cache_error(model)
    return name


@functools.cache
def _cache_argument(cls: type) -> str | None:
    params = inspect.signature(cls.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def _cache_given(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))


def check_no_checkpointing(model: nn.Module) -> None:
    """transformers drops the cache of every checkpointed layer while training (a replayed layer would
    append to it twice), which would drop the prefix: refuse instead of failing on a shape deep inside."""
    if not (model.training and torch.is_grad_enabled()):
        return
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise RequestError(
            "prompt and prefix adapters cannot train with gradient checkpointing: transformers drops the "
            "key/value cache (where the prefix is) in checkpointed layers. Turn it off "
            "(gradient_checkpointing: false, or model.gradient_checkpointing_disable())"
        )


class Geometry(NamedTuple):
    """A decoder's attention layout, as prompt and prefix adapters need it."""

    layers: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (fewer than `heads` with grouped-query attention)
    head_dim: int
    hidden: int  # the token embedding size


def model_geometry(model: nn.Module) -> Geometry:
    """The attention layout of a decoder language model, from its config; a TargetError naming the
    model class and what is missing when its attention cannot take a key/value prefix."""
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    config = get() if callable(get) else config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise TargetError(
            f"cannot read the attention layout of {type(model).__name__}: its config needs "
            "num_hidden_layers, num_attention_heads and hidden_size (or n_layer, n_head, n_embd). Prompt "
            "and prefix tuning need a decoder language model (e.g. LlamaForCausalLM)"
        )
    if _cache_argument(type(model)) is None:
        raise _no_cache_error(model)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Geometry(int(layers), int(heads), int(kv_heads), int(head_dim), int(hidden))


def _no_cache_error(model: nn.Module) -> TargetError:
    return TargetError(
        f"{type(model).__name__}'s forward takes no key/value cache (`cache` or `past_key_values`), so "
        "prompt and prefix tuning cannot reach its attention; they need a decoder language model (e.g. "
        "LlamaForCausalLM, GPT2LMHeadModel); use a layer method such as LoRA for this model"
    )


def prefix_rows(
    state: AdapterState,
    adapters: Mapping[str, nn.Module],
    model: nn.Module,
    batch: int | None,
    *,
    generating: bool = False,
) -> list[KV | None] | None:
    """Each row's key/value prefix from the whole-model adapters that apply (None: no prefix for
    that row), or None when none applies. Computed once per adapter per call, with gradients."""
    if state.disabled or not len(adapters) or batch is None:
        return None
    routing = state.rows
    if routing is None:
        active = [n for n in state.active if n in adapters]
        if len(active) > 1:
            raise AdapterStateError(
                f"adapters {active} are all active, and each brings its own prompt or prefix; "
                "activate one of them (set_adapter), or give rows different ones (adapter_names)"
            )
        return [adapters[active[0]].prefix_kv(model)] * batch if active else None
    wanted = [n for n in routing.unique if n in adapters]
    if not wanted:
        return None
    before = state.rows, state.disabled
    state.rows, state.disabled = None, True  # a row's prompt runs without layer adapters
    try:
        kv = {n: adapters[n].prefix_kv(model) for n in wanted}
    finally:
        state.rows, state.disabled = before
    names = [kv.get(n) if n is not None else None for n in routing.names]
    repeat = 1 if generating else routing.repeat_for(batch)
    return [r for r in names for _ in range(repeat)]
