"""The registry of adapter methods, with what each can do declared as data.

Shared code and the contract tests read these capabilities instead of special-casing method names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .lora import LoraLayer
from .lora_config import LoraConfig


@dataclass(frozen=True)
class MethodSpec:
    """One adapter method and its capabilities."""

    name: str
    description: str
    config_cls: type
    layer_cls: type
    peft_type: str | None  # the method's name in HF PEFT's format, None if PEFT lacks it
    supports_merge: bool  # can fold into the base weights (zero inference overhead)
    supports_mixed_batch: bool  # rows of one batch may use different adapters
    variants: dict[str, dict]  # named config presets the contract tests run (e.g. rsLoRA, DoRA)


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(
        name="lora",
        description="low-rank update (alpha/r)·B·A; rsLoRA and DoRA as flags",
        config_cls=LoraConfig,
        layer_cls=LoraLayer,
        peft_type="LORA",
        supports_merge=True,
        supports_mixed_batch=True,
        variants={"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}},
    ),
}


def method_for(config: object) -> MethodSpec:
    """The registered method whose config class `config` is."""
    for spec in METHODS.values():
        if isinstance(config, spec.config_cls):
            return spec
    raise TypeError(
        f"{type(config).__name__} is not the config of a registered method ({', '.join(METHODS)})"
    )


__all__ = ["METHODS", "MethodSpec", "LoraConfig", "LoraLayer", "method_for"]
