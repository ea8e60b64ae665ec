"""The registry of adapter methods: each a `MethodSpec` (see `spec.py`) with its capabilities as data.

Shared code and the contract tests read these specs instead of special-casing method names; adding a
method is one file under `methods/` plus one entry here.
"""

from __future__ import annotations

from . import bottleneck, ia3, lora, prefix, prompt
from .lora import LoraLayer
from .lora_config import LoraConfig
from .spec import AdapterLayer, MethodSpec, ModelAdapter, is_adapter_layer

# Each method module defines `SPEC: MethodSpec`; this is the order `peftkit` lists them in.
METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (lora.SPEC, ia3.SPEC, prompt.SPEC, prefix.SPEC, bottleneck.SPEC)
}


def method_for(config: object) -> MethodSpec:
    """The registered method whose config class `config` is."""
    for spec in METHODS.values():
        if isinstance(config, spec.config_cls):
            return spec
    from ..errors import ConfigError

    raise ConfigError(
        f"{type(config).__name__} is not the config of a registered method; methods: {', '.join(METHODS)} "
        f"(their configs: {', '.join(s.config_cls.__name__ for s in METHODS.values())})"
    )


def method_of_layer(layer: object) -> MethodSpec:
    """The registered method an adapter layer belongs to."""
    for spec in METHODS.values():
        if spec.layer_cls is not None and isinstance(layer, spec.layer_cls):
            return spec
    raise TypeError(f"{type(layer).__name__} is not a registered method's adapter layer")


__all__ = [
    "METHODS",
    "AdapterLayer",
    "LoraConfig",
    "LoraLayer",
    "MethodSpec",
    "ModelAdapter",
    "is_adapter_layer",
    "method_for",
    "method_of_layer",
]
