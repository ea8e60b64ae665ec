"""LoRA's configuration: what to adapt and how. Field names follow HF PEFT's `adapter_config.json`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..core.layer_types import ALL_LINEAR
from ..values import number_from_text
from .config_fields import (
    check,
    check_regex,
    config_field,
    config_from_fields,
    file_fields,
    is_int,
    is_num,
    method_config,
)
from .targets import embed_targets, file_targets, target_field

BIAS_CHOICES = ("none", "all", "lora_only")


@method_config("LoRA")
@dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter: ΔW = (lora_alpha / r) · B·A on the target layers, B = 0 at init.

    Validated on construction and never mutated afterwards; `replace()` returns a new config.
    `targets`: the layers to adapt as one `Targets` value (what `peftkit.core.inject` reads).
    to_dict, from_dict, replace, field_docs and defaults come from `method_config`.
    """

    r: int = config_field(8, "rank of the update (the inner dimension of B·A)")
    lora_alpha: float = config_field(8, "scale numerator: the update is multiplied by lora_alpha / r")
    lora_dropout: float = config_field(0.0, "dropout probability on the adapter's input while training")
    target_modules: tuple[str, ...] | str = config_field(
        ALL_LINEAR,
        "layers to adapt: names matched exactly or as a dotted suffix ('q_proj' matches "
        "'model.layers.0.self_attn.q_proj'), one regex string matched against the full name (a plain "
        "name that matches no full name, like 'q_proj', means [q_proj]), or 'all-linear' (every "
        "linear layer except the output head)",
    )
    exclude_modules: tuple[str, ...] | str | None = target_field("exclude_modules")
    layers_to_transform: tuple[int, ...] | None = target_field("layers_to_transform")
    layers_pattern: tuple[str, ...] | None = target_field("layers_pattern")
    rank_pattern: dict[str, int] = config_field(
        dict, "per-module rank overrides {regex matched as a name suffix: r}"
    )
    alpha_pattern: dict[str, float] = config_field(dict, "per-module alpha overrides {regex: lora_alpha}")
    use_rslora: bool = config_field(
        False, "rank-stabilised scaling lora_alpha / sqrt(r) instead of lora_alpha / r"
    )
    use_dora: bool = config_field(
        False, "DoRA: learn a magnitude per output feature, direction from W + dW (its norm detached)"
    )
    init_lora_weights: bool | str = config_field(
        True,
        "true: Kaiming-uniform A, zero B (embeddings: zero A, normal B); 'gaussian': normal A with "
        "std 1/r, zero B; false: random A and B, so the adapter is not a no-op (for tests)",
    )
    bias: str = config_field("none", "which biases train with the adapter: 'none', 'all' or 'lora_only'")
    modules_to_save: tuple[str, ...] | None = target_field("modules_to_save")

    def __post_init__(self) -> None:
        for name in ("lora_alpha", "lora_dropout"):
            object.__setattr__(self, name, number_from_text(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, name) or {}
            check(isinstance(patterns, dict), name, patterns, "a mapping {module regex: value}")
            object.__setattr__(self, name, dict(patterns))
        alphas = {key: number_from_text(value) for key, value in self.alpha_pattern.items()}
        object.__setattr__(self, "alpha_pattern", alphas)
        self._validate()

    def _validate(self) -> None:
        check(is_int(self.r) and self.r > 0, "r", self.r, "a positive integer, e.g. 8 or 16")
        check(
            is_num(self.lora_alpha) and self.lora_alpha > 0,
            "lora_alpha",
            self.lora_alpha,
            "a positive number",
        )
        check(
            is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1,
            "lora_dropout",
            self.lora_dropout,
            "a number in [0, 1)",
        )
        check(self.bias in BIAS_CHOICES, "bias", self.bias, f"one of {BIAS_CHOICES}")
        init = self.init_lora_weights
        check(
            init is True or init is False or init == "gaussian",
            "init_lora_weights",
            init,
            "true (Kaiming A, zero B), 'gaussian', or false (random, for tests)",
        )
        check(isinstance(self.use_rslora, bool), "use_rslora", self.use_rslora, "true or false")
        check(isinstance(self.use_dora, bool), "use_dora", self.use_dora, "true or false")
        embed_targets(self)  # target_modules ... modules_to_save, normalised, and `self.targets`
        for key, value in self.rank_pattern.items():
            check_regex(f"rank_pattern key {key!r}", key)
            check(is_int(value) and value > 0, f"rank_pattern[{key!r}]", value, "a positive integer")
        for key, value in self.alpha_pattern.items():
            check_regex(f"alpha_pattern key {key!r}", key)
            check(is_num(value) and value > 0, f"alpha_pattern[{key!r}]", value, "a positive number")

    # -- derived values -------------------------------------------------------------------------
    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The (r, lora_alpha) for one module, after rank_pattern / alpha_pattern overrides."""
        return (
            _first_pattern(self.rank_pattern, module_name, self.r),
            _first_pattern(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def scaling(self, r: int, alpha: float) -> float:
        """The factor the update B·A is multiplied by."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_matches(key: str, name: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key applies to module `name` (HF PEFT semantics: the
    key is a regex that must match a dotted suffix of the name)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _first_pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if pattern_matches(key, name):
            return value
    return default


# -- the adapter_config.json of a LoRA adapter (HF PEFT's keys) -------------------------------------
# LoRA config keys that carry no meaning for loading trained weights.
_IGNORED_KEYS = {
    "megatron_core",
    "fan_in_fan_out",  # peftkit reads the layout from the layer type (GPT-2 Conv1D is transposed)
    "qalora_group_size",
    "ensure_weight_tying",
    "eva_config",  # EVA only chooses the initial values, which the file overrides
}
# Initialisations that only choose starting values (the file's weights override them).
_INIT_ONLY = {"eva", "orthogonal"}


def config_to_file(config: LoraConfig, targets: list[str], kinds: list[str]) -> dict[str, Any]:
    """The LoRA part of adapter_config.json: the fields, target_modules resolved to the matched layers."""
    data = config.to_dict()
    data["target_modules"] = sorted(targets)
    data.update(fan_in_fan_out="conv1d_gpt2" in kinds, lora_bias=False)
    return data


def config_from_file(data: dict[str, Any], source: Any) -> LoraConfig:
    """A LoraConfig from the LoRA fields of an adapter_config.json written by peftkit or HF PEFT."""
    from ..errors import AdapterFileError

    ours = file_fields(LoraConfig, data, source, _IGNORED_KEYS)
    init = ours.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in _INIT_ONLY:
        ours["init_lora_weights"] = True
    elif isinstance(init, str) and init != "gaussian":
        raise AdapterFileError(
            f"{source}: init_lora_weights={init!r} changes the base model's weights (PiSSA/OLoRA/LoftQ/...); "
            "convert it to a plain LoRA with HF PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    return config_from_fields(LoraConfig, file_targets(ours), source)
