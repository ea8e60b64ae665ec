"""What every layer method's adapter layer does the same way, as plain functions over the layer (no
base class): its bookkeeping, which adapters run, each row's slot in a mixed batch, stacked
per-adapter tensors cached while unchanged, and merging (idempotent, over the exact pre-merge weight,
undone exactly). A layer method then writes its own math: how one adapter changes the output, how the
stack is built, and how merged adapters change the weight.

The functions read the `AdapterLayer` attributes (`base_layer`, `specs`, `merged`, `unmerged_weight`
and, where a merge changes the bias, `unmerged_bias`), `state` (the model's shared `AdapterState`)
and `_cache` ({slot: (key, value)}, cleared whenever the adapters change); `setup` makes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..core.layer_types import float_dtype
from ..core.rows import AdapterState, RowRouting, row_slots

T = TypeVar("T")


# -- bookkeeping -------------------------------------------------------------------------------------
def setup(layer: nn.Module, base_layer: nn.Module, kind: Any, state: AdapterState) -> None:
    """Give a new adapter layer (from its __init__, before its own parameter tables) the attributes the
    functions here read."""
    layer.base_layer = base_layer
    layer.kind = kind
    layer.specs = {}  # adapter name -> its per-layer hyper-parameters, in the order added
    layer.merged = []
    # The weight before any merge, so unmerge restores it bit for bit (not W + Δ − Δ, nor W·l / l).
    layer.register_buffer("unmerged_weight", None, persistent=False)
    layer.state = state
    layer._cache = {}


def adapter_dtype(base_layer: nn.Module, asked: torch.dtype | None) -> torch.dtype:
    """The dtype of a new adapter's tensors: `asked`, else the base layer's compute dtype (float32 where
    that is not a float type)."""
    base = float_dtype(base_layer)
    return asked or (base if base.is_floating_point else torch.float32)


def added(layer: nn.Module, name: str, spec: Any) -> None:
    """Record adapter `name` (its tensors already in the layer's tables) with its hyper-parameters."""
    layer.specs[name] = spec
    layer._cache.clear()


def delete(layer: nn.Module, name: str, tables: tuple[nn.Module, ...]) -> None:
    """Remove adapter `name` from the layer's parameter tables and specs (it must not be merged)."""
    if name in layer.merged:
        raise RuntimeError(f"adapter {name!r} is merged into this layer; unmerge first")
    for table in tables:
        if name in table:
            del table[name]
    layer.specs.pop(name, None)
    layer._cache.clear()


# -- which adapters run --------------------------------------------------------------------------------
def bypassed(layer: nn.Module) -> bool:
    """Whether the layer is its base layer alone this call: adapters disabled, or none on this layer."""
    return layer.state.disabled or not layer.specs


def unmerged_active(layer: nn.Module) -> list[str]:
    """The active adapters of this layer that forward must apply (merged ones are in the weight)."""
    return [n for n in layer.state.active if n in layer.specs and n not in layer.merged]


def row_dispatch(layer: nn.Module, routing: RowRouting, batch: Tensor) -> tuple[Tensor, list[str] | None]:
    """Each row's slot in the layer's stacks (N,), len(specs) for "no adapter on this layer"; and, when
    every row has the same slot, the adapters that slot applies ([] for none), so the layer can take
    its plain path. Reused across the forwards of one mixed batch (`row_slots`)."""
    names = list(layer.specs)
    slots, uniform = row_slots(routing, names, batch, layer._cache)
    return slots, None if uniform is None else names[uniform : uniform + 1]


# -- stacked tensors, cached -------------------------------------------------------------------------
def versions(tensors: list[Tensor]) -> tuple:
    # Cache keys: a tensor's version counter moves on every in-place update (optimizer steps,
    # load_state_dict), its data pointer on reassignment.
    return tuple((t._version, t.data_ptr()) for t in tensors)


def cached(layer: nn.Module, slot: str, key: tuple, build: Callable[[], T]) -> T:
    """`build()`, kept in the layer's cache under `slot` and reused while `key` is the same. Keys also
    hold the inference-mode flag: tensors made under inference_mode cannot enter autograd later."""
    key = (*key, torch.is_inference_mode_enabled())
    hit = layer._cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    layer._cache[slot] = (key, value)
    return value


def stacked(layer: nn.Module, build: Callable[[], T], *key: Any) -> T:
    """The layer's per-adapter tensors stacked for a mixed batch (`build()`): cached while every adapter
    parameter (and whatever `key` adds) is unchanged; rebuilt on every call while they train, so
    gradients flow through the stack."""
    params = [p for n in layer.specs for p in layer.adapter_tensors(n).values()]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return build()
    return cached(layer, "stacks", (versions(params), *key), build)


# -- merging -------------------------------------------------------------------------------------------
def to_merge(layer: nn.Module, names: list[str]) -> list[str]:
    """The adapters of `names` a merge adds: those on this layer not merged yet, so merging twice changes
    nothing. Before the first merge, keeps the exact weight (and bias, for a layer with
    `unmerged_bias`); the layer then computes its weight from those with `layer.merged + todo`."""
    todo = [n for n in names if n in layer.specs and n not in layer.merged]
    if todo and layer.unmerged_weight is None:
        base = layer.base_layer
        layer.unmerged_weight = base.weight.detach().clone()
        if hasattr(layer, "unmerged_bias"):
            layer.unmerged_bias = base.bias.detach().clone() if base.bias is not None else None
    return todo


def merged(layer: nn.Module, todo: list[str]) -> None:
    """Record that adapters `todo` are now in the base weight."""
    layer.merged = layer.merged + todo
    layer._cache.clear()


def unmerge(layer: nn.Module) -> None:
    """Put back the exact pre-merge weight (and bias), and forget every merge."""
    if layer.unmerged_weight is None:
        return
    base, bias = layer.base_layer, getattr(layer, "unmerged_bias", None)
    with torch.no_grad():
        base.weight.copy_(layer.unmerged_weight)
        if bias is not None:
            base.bias.copy_(bias)
    layer.unmerged_weight = None
    if hasattr(layer, "unmerged_bias"):
        layer.unmerged_bias = None
    layer.merged = []
    layer._cache.clear()
