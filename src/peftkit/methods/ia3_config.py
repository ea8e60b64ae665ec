"""IA³'s configuration (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"), its adapter_config.json form and what `peftkit info` says about it.

Field names follow HF PEFT's `IA3Config`, so one adapter_config.json means the same in both.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..core.layer_types import ALL_LINEAR
from ..errors import AdapterFileError, ConfigError, TargetError
from .config_fields import check, check_names, config_field, config_from_fields, file_fields, method_config
from .targets import embed_targets, file_targets, target_field

KEY_SUFFIX = "ia3_l"  # HF PEFT's file key suffix (and parameter name) for an IA³ vector


@method_config("IA³")
@dataclass(frozen=True)
class IA3Config:
    """IA³: a learned vector per target layer rescales its output (y = base(x) ⊙ l), or, for
    feedforward modules, its input (y = base(x ⊙ l)); the vectors start at 1 (a no-op).

    Validated on construction and never mutated afterwards; `replace()` returns a new config.
    `targets`: the layers to scale as one `Targets` value (what `peftkit.core.inject` reads).
    to_dict, from_dict, replace, field_docs and defaults come from `method_config`.
    """

    target_modules: tuple[str, ...] | str = config_field(
        ("k_proj", "v_proj", "down_proj"),
        "layers to scale: names matched exactly or as a dotted suffix, one regex string matched against "
        "the full name, or 'all-linear'. The default is for Llama-family models (the built-in model); "
        "GPT-2 style models use e.g. ['c_attn', 'mlp.c_proj']",
    )
    feedforward_modules: tuple[str, ...] | str = config_field(
        ("down_proj",),
        "targets whose input is scaled instead of their output (the paper's feedforward rescaling): "
        "names that are also in target_modules, a regex over the full name, or [] for none. GPT-2 "
        "style models use e.g. ['mlp.c_proj']",
    )
    exclude_modules: tuple[str, ...] | str | None = target_field("exclude_modules", "scale")
    layers_to_transform: tuple[int, ...] | None = target_field("layers_to_transform", "scale")
    layers_pattern: tuple[str, ...] | None = target_field("layers_pattern")
    modules_to_save: tuple[str, ...] | None = target_field("modules_to_save")
    init_ia3_weights: bool = config_field(
        True, "true: vectors start at 1 (the adapter is a no-op); false: random around 1 (for tests)"
    )

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)):  # PEFT's configs hold sets: keep a stable order
                value = sorted(value)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        # IA³ words its module-list errors its own way, so it checks those lists before `embed_targets`
        # (which then finds them valid) checks the layer fields.
        _check_names("target_modules", self.target_modules, allow_none=False, allow_empty=False)
        if self.feedforward_modules == ALL_LINEAR:
            raise ConfigError(
                "feedforward_modules cannot be 'all-linear': list the targets whose input is scaled "
                "(e.g. ['down_proj']), or [] for none"
            )
        _check_names("feedforward_modules", self.feedforward_modules, allow_none=False, allow_empty=True)
        _check_names("exclude_modules", self.exclude_modules, allow_none=True, allow_empty=False)
        _check_names("modules_to_save", self.modules_to_save, allow_none=True, allow_empty=False, regex=False)
        check(
            isinstance(self.init_ia3_weights, bool),
            "init_ia3_weights",
            self.init_ia3_weights,
            "true or false",
        )
        embed_targets(self)  # target_modules ... modules_to_save, normalised, and `self.targets`
        if isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple):
            # As HF PEFT: with both given as lists, every feedforward name must be a target name.
            for entry in self.feedforward_modules:
                if entry not in self.target_modules:
                    raise ConfigError(
                        f"feedforward_modules entry {entry!r} is not in target_modules "
                        f"{list(self.target_modules)}: a feedforward module is a target whose input is "
                        f"scaled; add {entry!r} to target_modules, or remove it from feedforward_modules"
                    )

    # -- derived values -------------------------------------------------------------------------
    def is_feedforward(self, module_name: str) -> bool:
        """Whether IA³ scales module `module_name`'s input (else its output)."""
        return _matches(module_name, self.feedforward_modules)


def _check_names(key: str, value: Any, *, allow_none: bool, allow_empty: bool, regex: bool = True) -> None:
    """A list of module names (tuple), or (with `regex`) one regex string; None only if allowed."""
    what = (
        "a list of module names"
        + (" ([] for none)" if allow_empty else "")
        + (" or a regex" if regex else "")
    )
    check_names(key, value, allow_none=allow_none, allow_regex=regex, allow_empty=allow_empty, expected=what)


def _matches(name: str, spec: tuple[str, ...] | str) -> bool:
    """inject.name_matches' rule: a list matches a name or a dotted suffix, a string is a full regex.
    (HF PEFT matches feedforward names with a bare `endswith`; peftkit never matches a substring, and
    PEFT's own rule that feedforward names are target names makes the two agree on its files.)"""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def check_new_targets(config: IA3Config, targets: list) -> None:
    """A new adapter's feedforward_modules must each name one of its targets: else the layer meant to
    have its input scaled would have its output scaled (or none would), with no sign of it."""
    names = [t.name for t in targets]
    ff = config.feedforward_modules
    for entry in (ff,) if isinstance(ff, str) else ff:
        if not any(_matches(n, entry if isinstance(ff, str) else (entry,)) for n in names):
            ends = sorted({n.rsplit(".", 1)[-1] for n in names})
            regex = ""
            if isinstance(ff, str):  # e.g. `--ia3.feedforward_modules down_proj` on the command line
                regex = f"; a single string is a regex over the full module name (did you mean [{ff!r}]?)"
            raise TargetError(
                f"feedforward_modules entry {entry!r} matches none of the adapter's target layers (they end "
                f"in {', '.join(ends)}){regex}; name targets whose input IA³ should scale, e.g. ['down_proj'] "
                "for Llama-family models or ['mlp.c_proj'] for GPT-2, or [] for none"
            )


# -- the adapter_config.json of an IA³ adapter (HF PEFT's keys) --------------------------------------
_IGNORED_KEYS = {
    "fan_in_fan_out"
}  # peftkit reads the layout from the layer type (GPT-2 Conv1D is transposed)


def config_to_file(config: IA3Config, targets: list[str], kinds: list[str]) -> dict[str, Any]:
    """The IA³ part of adapter_config.json, in HF PEFT's keys. target_modules and feedforward_modules
    list the matched layers by full name, so the file means the same wherever it is read (a regex,
    'all-linear' or layers_to_transform are resolved here; PEFT's IA³ has no layers_to_transform)."""
    return {
        "target_modules": sorted(targets),
        "feedforward_modules": sorted(n for n in targets if config.is_feedforward(n)),
        "exclude_modules": list(config.exclude_modules)
        if isinstance(config.exclude_modules, tuple)
        else config.exclude_modules,
        "fan_in_fan_out": "conv1d_gpt2" in kinds,  # what PEFT writes (it forces it on for GPT-2's Conv1D)
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "init_ia3_weights": config.init_ia3_weights,
    }


def config_from_file(data: dict[str, Any], source: Any) -> IA3Config:
    """An IA3Config from the IA³ fields of an adapter_config.json written by peftkit or HF PEFT."""
    ours = file_fields(
        IA3Config, data, source, _IGNORED_KEYS, unsupported="an option peftkit's IA³ does not support"
    )
    for key in ("target_modules", "feedforward_modules"):
        if ours.get(key) is None:
            # HF PEFT fills these from its per-architecture tables when they are null; its own saves
            # always write them, so a null here is a hand-written file.
            raise AdapterFileError(
                f"{source}: {key} is missing or null; write the module names into adapter_config.json "
                "(e.g. target_modules ['k_proj', 'v_proj', 'down_proj'] and feedforward_modules ['down_proj'] "
                "for a Llama-family model)"
            )
    return config_from_fields(IA3Config, file_targets(ours), source)


# -- `peftkit info` ------------------------------------------------------------------------------------
def file_layers(keys: list[str]) -> list[str]:
    """The module paths that carry IA³ vectors, from a file's layer keys (prefix removed), sorted."""
    suffix = "." + KEY_SUFFIX
    return sorted(k.removesuffix(suffix) for k in keys if k.endswith(suffix))


def describe(config: IA3Config, tensors: dict[str, Tensor], modules: list[str]) -> dict[str, Any]:
    """IA³'s facts: which layers have their input scaled (feedforward) and which their output."""
    inputs = [m for m in modules if config.is_feedforward(m)]
    outputs = [m for m in modules if not config.is_feedforward(m)]
    return {
        "feedforward_modules": _listed(config.feedforward_modules),
        "input_scaled": _suffix_counts(inputs),
        "output_scaled": _suffix_counts(outputs),
    }


def info_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """IA³'s lines of the text report."""
    return [
        ("scales outputs", _counts_text(f["output_scaled"])),
        ("scales inputs", _counts_text(f["input_scaled"])),
    ]


def _listed(spec: tuple[str, ...] | str) -> list[str] | str:
    return list(spec) if isinstance(spec, tuple) else spec


def _suffix_counts(modules: list[str]) -> dict[str, int]:
    """{last name component: how many layers}, e.g. {"k_proj": 2, "v_proj": 2}."""
    return dict(sorted(Counter(m.rsplit(".", 1)[-1] for m in modules).items()))


def _counts_text(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    total = sum(counts.values())
    return f"{', '.join(counts)} ({total} layer{'s' * (total != 1)})"
