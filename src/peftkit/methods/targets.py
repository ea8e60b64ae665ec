"""Which layers a layer method adapts, as one checked value: HF PEFT's `target_modules`,
`exclude_modules`, `layers_to_transform` and `layers_pattern`, plus `modules_to_save` (whole modules
trained beside the adapter, which targeting must leave alone).

Each layer method's config keeps these as flat fields, so its constructor, its `to_dict()`, its
adapter_config.json and its command-line options keep PEFT's keys, and embeds them as one `Targets`
(`config.targets`, made by `embed_targets`) that `peftkit.core.inject` reads to find the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .config_fields import check, check_names, config_field, is_int


@dataclass(frozen=True)
class Targets:
    """The layers an adapter goes on, normalised and checked on construction: lists become tuples, one
    layer index or one layers_pattern name a 1-tuple. Matching rules: `peftkit.core.inject`."""

    target_modules: tuple[str, ...] | str  # names or dotted suffixes, one regex, or "all-linear"
    exclude_modules: tuple[str, ...] | str | None = None  # matched like target_modules
    layers_to_transform: tuple[int, ...] | None = None  # layer indices to keep (None: all)
    layers_pattern: tuple[str, ...] | None = None  # the layer list(s) those indices count in
    modules_to_save: tuple[str, ...] | None = None  # trained in full, so never targeted

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        pattern, layers = self.layers_pattern, self.layers_to_transform
        object.__setattr__(
            self, "layers_pattern", (pattern,) if isinstance(pattern, str) else _as_tuple(pattern)
        )
        object.__setattr__(self, "layers_to_transform", (layers,) if is_int(layers) else _as_tuple(layers))
        self._check()

    def _check(self) -> None:
        check_names("target_modules", self.target_modules, allow_none=False)
        check_names("exclude_modules", self.exclude_modules, allow_none=True)
        check_names("modules_to_save", self.modules_to_save, allow_none=True, allow_regex=False)
        layers = self.layers_to_transform
        if layers is not None:
            ok = isinstance(layers, tuple) and all(is_int(i) and i >= 0 for i in layers)
            check(ok, "layers_to_transform", layers, "a layer index or a list of them")
        pattern = self.layers_pattern
        if pattern is not None:
            ok = isinstance(pattern, tuple) and all(isinstance(p, str) and p for p in pattern)
            check(ok, "layers_pattern", pattern, "a module-list name like 'layers' or a list of them")


def embed_targets(config: Any) -> None:
    """Check `config`'s target fields as one `Targets`, store them back normalised (the flat fields
    stay what PEFT's files and the CLI read), and keep the value as `config.targets`. For a layer
    method's frozen config, from its `__post_init__`, where its checks of these fields belong."""
    targets = Targets(**{f.name: getattr(config, f.name) for f in fields(Targets)})
    for f in fields(Targets):
        object.__setattr__(config, f.name, getattr(targets, f.name))
    object.__setattr__(config, "targets", targets)  # not a dataclass field: no key of its own


def file_targets(fields: dict[str, Any]) -> dict[str, Any]:
    """A layer method's fields read from an adapter_config.json, with layers_pattern [] (HF PEFT's
    spelling of "none" in some files) as null, so a loaded config says it the one way."""
    return {**fields, "layers_pattern": None} if fields.get("layers_pattern") == [] else fields


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# -- the fields every layer method's config declares (the same words in each) ------------------------
_HELP = {
    "exclude_modules": "layers never to {verb}, matched like target_modules",
    "layers_to_transform": "only {verb} layers with these indices (the number in e.g. 'model.layers.3.mlp')",
    "layers_pattern": "name(s) of the layer list that layers_to_transform indexes (e.g. 'layers', 'h')",
    "modules_to_save": "modules trained in full alongside the adapter (e.g. a classification head), matched by suffix",
}


def target_field(name: str, verb: str = "adapt") -> Any:
    """Config field `name` (one of `_HELP`'s; default None), with its documentation; `verb` says what
    the method does to a layer ("scale" for IA³)."""
    return config_field(None, _HELP[name].format(verb=verb))
