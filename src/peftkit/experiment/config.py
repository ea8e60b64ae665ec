"""An experiment file: an ordinary training config plus the sections `compare` and `tune` read.

    base: smollm2-135m          # any training key, shared by every run
    data: task:dates
    max_steps: 50
    variants:                   # peftkit compare: each entry overrides the shared keys
      - {name: lora-r8, lora: {r: 8}}
      - {method: ia3, lr: 3e-3}
    search:                     # peftkit tune: the ranges to search (see peftkit.tune)
      lr: {low: 1e-4, high: 3e-3, log: true}
    evaluate:                   # how runs are scored (see peftkit.compare)
      examples: 100

Every variant's config is built (and so checked) when the file is read, before anything trains.
Relative paths in the file (data, val_data and base, in the shared keys and the variants;
evaluate.data and evaluate.general_text) are relative to its folder, as in a training config.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..methods import METHODS
from ..train.config import TrainConfig, load_config, read_config_file
from ..train.config_paths import data_path, file_path, resolve_file_paths
from ..values import short_repr

SECTIONS = ("variants", "search", "evaluate")
"""The experiment's own top-level keys; every other key is a training key."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,63}")


@dataclass(frozen=True)
class Variant:
    name: str  # unique in the experiment, usable as a directory name
    overrides: dict[str, Any]  # training keys, nested as in the YAML (lora: {r: 8})


@dataclass(frozen=True)
class Experiment:
    path: Path | None
    shared: dict[str, Any]  # the training keys every run starts from
    variants: list[Variant] = field(default_factory=list)
    search: dict[str, Any] | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)

    def config(self, overrides: dict[str, Any] | None = None, **keys: Any) -> TrainConfig:
        """The training config of one run: the shared keys, then `overrides` (nested or dotted
        keys), then `keys` (top-level, e.g. output_dir=...)."""
        data = merged(self.shared, expand_dotted(overrides or {}))
        data = merged(data, keys)
        return load_config(None, flatten(data))


def read_experiment(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and check an experiment file; `overrides` (dotted keys) apply to the shared keys."""
    data = read_config_file(path, "experiment") if path is not None else {}
    path = Path(path) if path is not None else None
    if overrides and "output_dir" in overrides:
        raise ConfigError(
            "--output_dir: compare and tune place every run themselves (under --out); give --out instead"
        )
    own = {k: data.pop(k) for k in SECTIONS if k in data}
    if path is not None:  # the file's paths are relative to its folder; --KEY overrides to the shell's
        data, own = resolve_file_paths(data, path), _own_paths(own, path)
    shared = merged(data, expand_dotted(overrides or {}))
    experiment = Experiment(
        path=path,
        shared=shared,
        variants=_variants(own.get("variants")),
        search=_mapping(own.get("search"), "search"),
        evaluation=_mapping(own.get("evaluate"), "evaluate") or {},
    )
    experiment.config()  # the shared keys alone must make a valid config
    for v in experiment.variants:
        try:
            experiment.config(v.overrides)
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from None
    return experiment


def _own_paths(own: dict[str, Any], path: Path) -> dict[str, Any]:
    """The experiment's sections with their relative paths made absolute against the file's folder:
    each variant's data and base, and the scored data and general text of `evaluate:` (the shapes
    are checked later; what is not a mapping is left for those checks to name)."""
    own = dict(own)
    if isinstance(own.get("variants"), list):
        own["variants"] = [resolve_file_paths(v, path) if isinstance(v, dict) else v for v in own["variants"]]
    evaluate = own.get("evaluate")
    if isinstance(evaluate, dict):
        evaluate = dict(evaluate)
        if isinstance(evaluate.get("data"), str):
            evaluate["data"] = data_path(evaluate["data"], path.parent, "evaluate.data")
        if isinstance(evaluate.get("general_text"), str):
            evaluate["general_text"] = file_path(
                evaluate["general_text"], path.parent, "evaluate.general_text"
            )
        own["evaluate"] = evaluate
    return own


def _mapping(value: Any, key: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key} must be a mapping of keys to values, found {short_repr(value)}")
    return value


def _variants(value: Any) -> list[Variant]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(
            f"variants must be a list of mappings (- {{name: lora-r8, lora: {{r: 8}}}}), found {short_repr(value)}"
        )
    out: list[Variant] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise ConfigError(f"variants[{i}] must be a mapping of config keys, found {short_repr(entry)}")
        entry = dict(entry)
        name = entry.pop("name", None)
        bad = [k for k in entry if k in SECTIONS or k == "output_dir"]
        if bad:
            raise ConfigError(f"variants[{i}] sets {bad[0]!r}, which a variant cannot change; remove it")
        name = _variant_name(name, entry, i)
        if name in {v.name for v in out}:
            raise ConfigError(f"two variants are named {name!r}; give each a distinct name")
        out.append(Variant(name, expand_dotted(entry)))
    return out


def _variant_name(name: Any, entry: dict[str, Any], i: int) -> str:
    if name is None:  # from what it changes: {method: ia3, lr: 3e-3} -> method=ia3,lr=0.003
        parts = [f"{k}={v}" for k, v in flatten(expand_dotted(entry)).items()]
        name = re.sub(r"[^A-Za-z0-9._=-]+", "-", ",".join(parts).replace(",", "_"))[:64] or "shared"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"variants[{i}] name {short_repr(name)} must be 1-64 letters, digits, '.', '_', '=' or '-', "
            "starting with a letter or digit (it names the variant's run directory)"
        )
    return name


def expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """{"lora.r": 8} -> {"lora": {"r": 8}}; nested mappings are kept (and copied)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {part} is not a mapping")
        node[leaf] = merged(node[leaf], value) if isinstance(node.get(leaf), dict) else copy.deepcopy(value)
    return out


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` on top; a method's section merges key by key (lora: {r: 8} keeps alpha)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Nested method sections as dotted keys, the form `load_config` takes as overrides."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in METHODS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
