"""The training configuration: one frozen dataclass, read from YAML and command-line overrides.

Every field has a one-line help (shown by `peftkit train --help`) and a default in one place. Values
are checked against the field types; unknown keys are refused by name with a suggestion.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError, did_you_mean
from ..methods.lora_config import LoraConfig


def _f(default: Any, help: str) -> Any:
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything `peftkit train` needs. Paths are relative to the working directory."""

    base: str = _f(
        "smollm2-135m", "base model: a built-in name, an HF model directory, a .gguf file or a hub id"
    )
    data: str = _f(
        "task:dates", "training data: 'task:NAME' for a built-in task, or a .jsonl/.json/.csv file or dir"
    )
    val_data: str | None = _f(
        None, "validation data (same forms as data); default: split val_fraction off data"
    )
    val_fraction: float = _f(0.05, "share of data held out for validation when val_data is not given")
    max_examples: int | None = _f(None, "use at most this many training examples")
    system: str | None = _f(None, "system prompt added to conversations that have none")
    method: Literal["lora", "full"] = _f(
        "lora", "lora: train an adapter; full: fine-tune every weight (baseline)"
    )
    lora: LoraConfig = _f(
        lambda: LoraConfig(r=16, lora_alpha=32),
        "the adapter (LoraConfig fields: r, lora_alpha, target_modules, ...)",
    )
    max_length: int = _f(512, "longest tokenized example; longer ones are truncated as `truncation` says")
    train_on: Literal["completion", "last", "all"] = _f(
        "completion", "where the loss goes: every assistant turn, the last one, or all tokens"
    )
    truncation: Literal["left", "right", "drop", "error"] = _f("left", "what to do with over-long examples")
    epochs: int = _f(1, "passes over the training data (max_steps, if set, wins)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    batch_size: int = _f(16, "examples per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    lora_plus_ratio: float = _f(
        1.0, "LoRA+: learning rate of the B matrices = lr x this (e.g. 16); 1 = plain"
    )
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "learning-rate decay after warmup")
    warmup_ratio: float = _f(0.05, "share of the steps spent warming the learning rate up from 0")
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm to this (None: no clipping)")
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto",
        "bf16: bf16 weights and compute with fp32 master weights for what trains; auto: bf16 if supported",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (slower)")
    group_by_length: bool = _f(True, "batch examples of similar length together (less padding)")
    seed: int = _f(0, "seed for initialisation, data order and dropout")
    eval_every: int = _f(0, "validate every N optimizer steps (0: at the end of each epoch)")
    early_stopping_patience: int = _f(0, "stop after this many validations without a better loss (0: never)")
    checkpoint_every: int = _f(0, "write a resumable checkpoint every N optimizer steps (0: never)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    output_dir: str = _f(
        "runs/{task}-{method}", "where the run's files go ({task} and {method} are filled in)"
    )
    tensorboard: bool = _f(True, "also log metrics for TensorBoard (output_dir/tensorboard)")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        positive = ("max_length", "epochs", "batch_size", "grad_accum", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"invalid value for {name}: {getattr(self, name)!r}; expected an integer >= 1"
                )
        non_negative = ("eval_every", "early_stopping_patience", "checkpoint_every", "weight_decay")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid value for {name}: {getattr(self, name)!r}; expected >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(
                f"invalid value for val_fraction: {self.val_fraction!r}; expected a number in [0, 1)"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(
                f"invalid value for warmup_ratio: {self.warmup_ratio!r}; expected a number in [0, 1)"
            )
        if self.lr <= 0 or self.lora_plus_ratio <= 0:
            raise ConfigError("lr and lora_plus_ratio must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(
                f"invalid value for max_steps: {self.max_steps!r}; expected an integer >= 1 or null"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(
                f"invalid value for max_grad_norm: {self.max_grad_norm!r}; expected > 0 or null"
            )

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if dataclasses.is_dataclass(value) else value
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        return build(TrainConfig, {**self.to_dict(), **changes})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) with dotted-key overrides on top (e.g. {"lora.r": 8})."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, found {type(loaded).__name__}")
        data = loaded or {}
    if not isinstance(data.get("lora", {}), dict):
        raise ConfigError(f"lora must be a mapping of LoraConfig fields, found {data['lora']!r}")
    # Partial nested sections merge into the defaults (lora: {r: 8} keeps the default lora_alpha).
    data = {**data, "lora": {**TrainConfig().lora.to_dict(), **data.get("lora", {})}}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {part} is not a mapping")
        node[leaf] = value
    return build(TrainConfig, data)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (every key, defaults included)."""
    from ..io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from plain data, checking keys and value types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, found {data!r}")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix}{key!r}{did_you_mean(key, known)}; "
                f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}"
            )
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(hints[key], value, prefix + key) for key, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` checked against type `hint` (ints are accepted for floats; tuples from lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if hint is LoraConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of LoraConfig fields, found {value!r}")
            try:
                return LoraConfig.from_dict(value)
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
        return build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"invalid value for {key}: {value!r}; expected {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"invalid value for {key}: {value!r}; expected null")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"invalid value for {key}: {value!r}; expected one of {', '.join(map(repr, args))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"invalid value for {key}: {value!r}; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def field_help() -> dict[str, str]:
    """{dotted key: help} for every field, LoRA fields included (for the CLI and the docs)."""
    out = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig) if f.name != "lora"}
    out.update({f"lora.{k}": v for k, v in LoraConfig.field_docs().items()})
    return out
