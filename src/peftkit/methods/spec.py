"""What every method offers the shared code: a `MethodSpec` (data and a few functions) and, for
methods that wrap layers, an `AdapterLayer`; for methods that act on the whole model (soft prompts,
key/value prefixes), a `ModelAdapter`.

`AdaptedModel`, `formats/`, `inject.py` and the optimizer read these and nothing else, so a method is
one file under `methods/` plus one entry in `METHODS`; no shared code names a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..core.rows import AdapterState


class MethodConfig(Protocol):
    """A method's frozen config dataclass (HF PEFT's field names where PEFT has the method)."""

    def to_dict(self) -> dict[str, Any]: ...
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig: ...
    def replace(self, **changes: Any) -> MethodConfig: ...
    @classmethod
    def field_docs(cls) -> dict[str, str]: ...
    @classmethod
    def defaults(cls) -> dict[str, Any]: ...


class AdapterLayer(Protocol):
    """A module that holds one base layer (`base_layer`) and any number of named adapters of one method.

    Adapters run as the shared `AdapterState` says (active names, disabled, per-row routing). Nothing
    merges or unmerges as a side effect of forward/train/eval."""

    is_adapter_wrapper: bool  # True: `inject.unwrap` sees through it
    base_layer: nn.Module
    specs: dict[str, Any]  # adapter name -> its per-layer hyper-parameters, in the order added
    merged: list[str]  # adapters folded into the base weight (empty if the method cannot merge)
    unmerged_weight: Tensor | None  # the exact base weight before any merge, else None
    # (optional) unmerged_bias: the exact base bias before a merge that changes it (IA³), else None

    def add_adapter(
        self, name: str, config: Any, module_name: str, *, dtype: torch.dtype | None = None
    ) -> None: ...
    def delete_adapter(self, name: str) -> None: ...
    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters on this layer by role (e.g. lora_A); roles name file keys."""
        ...

    def merge(self, names: list[str]) -> None: ...
    def unmerge(self) -> None: ...


class ModelAdapter(Protocol):
    """An adapter that acts on the whole model (a soft prompt, key/value prefixes): it rewrites the
    base model's inputs before the call and its outputs after it (`AdaptedModel` calls these in its
    one adapted forward, used by training, evaluation and generation alike)."""

    def adapter_tensors(self) -> dict[str, Tensor]:
        """What the file holds, by role (e.g. prompt_embeddings): parameters, or tensors computed from
        them (prefix tuning saves its projected prefixes, as HF PEFT does)."""
        ...

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Take the saved tensors (keys as `adapter_tensors` names them), checked for shape already."""
        ...

    def prefix_kv(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Per attention layer, the key and value (H_kv, P, D) the real tokens attend to first; with
        gradients when training. `peftkit.core.kv_prefix` feeds them to the model (mask, positions, cache)."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    """One adapter method: its config, what it wraps and how, its file format and its capabilities.

    Layer methods set `wrap`/`layer_cls`/`kind_of` (their configs embed a `Targets` as `config.targets`);
    whole-model methods set `make_model_adapter`.
    """

    name: str  # the registry key, `method:` in a training config
    label: str  # how people write it: "LoRA", "IA³"
    description: str
    config_cls: type
    peft_type: str  # `peft_type` in adapter_config.json (HF PEFT's name where PEFT has the method)
    supports_merge: bool  # can fold into the base weights (zero inference overhead)
    supports_mixed_batch: bool  # rows of one batch may use different adapters
    variants: dict[str, dict]  # named config presets the contract tests run (e.g. rsLoRA, DoRA)
    # A new adapter leaves the outputs unchanged (LoRA's zero B). Soft prompts and prefixes cannot: even
    # zero keys and values take a share of every attention softmax.
    starts_unchanged: bool = True
    # (config) -> why an adapter with this config cannot take an inference weight other than 1, or None
    # when it can (its change is additive: y = base(x) + w·Δ(x)); None here: no adapter of the method can
    # (`peftkit.core.weights` then says so with the method's description).
    weight_problem: Callable[[Any], str | None] | None = None
    # -- layer methods -----------------------------------------------------------------------------
    layer_cls: type | None = None
    kind_of: Callable[[nn.Module], Any] | None = None  # a module's kind for this method, or None
    wrap: Callable[[nn.Module, Any, AdapterState], nn.Module] | None = None  # (module, kind, state)
    wrappable: str = ""  # the layer types it can wrap, for error messages
    unsupported_reason: Callable[[nn.Module], str | None] = lambda module: None
    expected_shapes: Callable[[nn.Module, Any, Any, str], dict[str, tuple[int, ...]]] | None = None
    check_new_targets: Callable[[Any, list], None] = lambda config, targets: None  # warnings
    key_suffix: Callable[[str, str], str] = lambda role, kind: role  # (role, kind name) -> key suffix
    # -- whole-model methods -------------------------------------------------------------------------
    make_model_adapter: Callable[[nn.Module, Any], nn.Module] | None = None  # (model, config)
    model_expected_shapes: Callable[[nn.Module, Any], dict[str, tuple[int, ...]]] | None = None
    # -- the file format -----------------------------------------------------------------------------
    # (config, where) -> the method's part of adapter_config.json; where: [(module name, layer)] for a
    # layer method, the ModelAdapter for a whole-model one
    config_to_file: Callable[[Any, Any], dict[str, Any]] = lambda config, where: config.to_dict()
    config_from_file: Callable[[dict[str, Any], Path], Any] | None = None
    # -- `peftkit info`: which modules a file's layer keys name, and the method's own facts and lines
    file_layers: Callable[[list[str]], list[str]] = lambda keys: []
    describe_method: Callable[[Any], str] | None = None  # e.g. "DoRA" for a LoRA config with use_dora
    describe: Callable[[Any, dict[str, Tensor], list[str]], dict[str, Any]] | None = None
    info_rows: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    # -- serving -------------------------------------------------------------------------------------
    # (adapter layer, adapter name) -> the adapter's effect on one nn.Linear as slot tensors for the
    # server's engine: any of A (r, in), B (out, r) with the scaling folded in, in_scale (in,),
    # out_scale (out,), bias_scale (out,); y = ((W·(x·in_scale) + B·A·x)·out_scale + bias·bias_scale.
    # None: the engine does not serve the method's layers.
    slot_tensors: Callable[[nn.Module, str], dict[str, Tensor]] | None = None
    # (config, module name, {role: tensor} from a checked file, in the served dtype) -> the same slot
    # tensors without attaching the adapter (the server's fast load), or None where they need the
    # attached layer (e.g. DoRA's factor); None: always attach
    file_slot_tensors: Callable[[Any, str, dict[str, Tensor]], dict[str, Tensor] | None] | None = None
    # the roles of the slot algebra the method's slot tensors use (A, B, in_scale, out_scale, bias_scale):
    # the engine serves the method when it holds them all; None: the engine does not serve its layers
    slot_roles: frozenset[str] | None = None
    # -- training ------------------------------------------------------------------------------------
    lr_scaled_roles: tuple[str, ...] = ()  # roles trained at lr x lora_plus_ratio (LoRA+: lora_B)
    no_decay_roles: tuple[str, ...] = ()  # roles never weight-decayed (besides biases and 1-d tensors)
    supports_gradient_checkpointing: bool = True
    train_default: Callable[[], Any] | None = (
        None  # the config a training run starts from (default: the class's)
    )

    @property
    def wraps_layers(self) -> bool:
        return self.layer_cls is not None


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether `module` is a method's adapter layer (not a modules_to_save copy)."""
    return getattr(module, "is_adapter_wrapper", False) and hasattr(module, "adapter_tensors")


__all__ = ["AdapterLayer", "MethodConfig", "MethodSpec", "ModelAdapter", "is_adapter_layer"]
