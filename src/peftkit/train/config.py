"""The training configuration: one frozen dataclass, read from YAML and command-line overrides.

Every field has a one-line help (shown by `peftkit train --help`) and a default in one place. Values
are checked against the field types, however the config is made (YAML, overrides, or the dataclass
built directly); unknown keys are refused by name with a suggestion. Float keys take what Python's
float() reads, so `5e-4` works although YAML 1.1 reads it as text; ints and bools never come from text.
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config_files import build, coerce, read_config_file, type_hints
from ..config_files import require as _require
from ..errors import ConfigError
from ..methods import METHODS
from ..methods.spec import MethodSpec
from ..values import short_repr as _short
from .config_paths import absolute_paths, resolve_file_paths

FULL = "full"  # `method: full`: fine-tune every weight, no adapter


def _f(default: Any, help: str) -> Any:
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class _Settings:
    """Everything `peftkit train` needs. In a config file, paths (data, val_data, a local base) are
    relative to the file's folder; on the command line and in Python, to the working directory;
    output_dir always to the working directory (see train.config_paths). Each registered method adds
    a section of its own, named after it (`lora:`, `ia3:`, ...): see `TrainConfig`."""

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
    method: str = _f(
        "lora",
        "the adapter method: " + ", ".join(METHODS) + "; or full: fine-tune every weight (the baseline). "
        "Its settings are the section of the same name (lora: {r: 16}); QLoRA is lora with quantize: nf4",
    )
    quantize: Literal["nf4"] | None = _f(
        None, "nf4: keep the frozen base weights in 4-bit NormalFloat (QLoRA with method lora)"
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
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm to this (null: no clipping)")
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto",
        "bf16: bf16 weights and compute with fp32 master weights for what trains; auto: bf16 if supported",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (slower)")
    group_by_length: bool = _f(True, "batch examples of similar length together (less padding)")
    seed: int = _f(0, "seed for initialisation, data order and dropout")
    eval_every: int = _f(
        0, "validate every N optimizer steps (0: at the end of each epoch), and always at the last step"
    )
    early_stopping_patience: int = _f(0, "stop after this many validations without a better loss (0: never)")
    checkpoint_every: int = _f(0, "write a resumable checkpoint every N optimizer steps (0: never)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    output_dir: str = _f(
        "runs/{task}-{method}",
        "where the run's files go ({task} and {method} are filled in), relative to the working directory "
        "even in a config file",
    )
    tensorboard: bool = _f(True, "also log metrics for TensorBoard (output_dir/tensorboard)")
    progress: bool = _f(True, "show progress bars on stderr: the training steps, and each validation pass")

    def __post_init__(self) -> None:
        # Built directly (not via load_config), values are checked and converted the same way: a
        # numeric string like "5e-4" becomes a float wherever a float is expected, as in a YAML file.
        hints = type_hints(TrainConfig)
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(hints[f.name], getattr(self, f.name), f.name))
        self._check_ranges()
        self._check_method()
        _check_output_dir(self.output_dir)

    def _check_method(self) -> None:
        valid = [*METHODS, FULL]
        _require(self.method in valid, "method", self.method, "one of " + ", ".join(map(repr, valid)))
        if self.method == FULL:
            _require(self.quantize is None, "quantize", self.quantize, "null with method full (4-bit weights "
                     "cannot train); use an adapter method, e.g. method: lora (QLoRA)")  # fmt: skip
            return
        spec = METHODS[self.method]
        if self.gradient_checkpointing and not spec.supports_gradient_checkpointing:
            raise ConfigError(
                f"gradient_checkpointing is not supported with method {self.method} ({spec.label}); set it "
                "to false"
            )

    def adapter(self) -> Any:
        """The chosen method's config (its section); None for full fine-tuning."""
        return None if self.method == FULL else getattr(self, self.method)

    def _check_ranges(self) -> None:
        for name in ("max_length", "epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("eval_every", "early_stopping_patience", "checkpoint_every"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        for name in ("max_steps", "max_examples"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, "an integer >= 1, or null for no limit")
        # torch.manual_seed takes [0, 2**64); refusing here fails before the base model loads.
        _require(0 <= self.seed < 2**64, "seed", self.seed, "an integer in [0, 2**64)")
        for name in ("val_fraction", "warmup_ratio"):
            value = getattr(self, name)
            _require(0 <= value < 1, name, value, "a number in [0, 1), e.g. 0.05")
        for name in ("lr", "lora_plus_ratio"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, value, "a finite number > 0, e.g. 2e-4")
        wd = self.weight_decay
        _require(math.isfinite(wd) and wd >= 0, "weight_decay", wd, "a finite number >= 0, e.g. 0.01")
        norm = self.max_grad_norm
        ok = norm is None or (math.isfinite(norm) and norm > 0)
        _require(ok, "max_grad_norm", norm, "a finite number > 0, or null for no clipping")
        for name in ("base", "data", "val_data"):
            value = getattr(self, name)
            _require(value is None or value.strip() != "", name, value, _NON_BLANK[name])

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if dataclasses.is_dataclass(value) else value
        return out

    def replace(self, **changes: Any) -> _Settings:
        return build(TrainConfig, {**self.to_dict(), **changes})


def _section(name: str, spec: MethodSpec) -> tuple[str, type, Any]:
    """A training config's section for one method: its config class, defaulting to what the method
    suggests for training (LoRA: r=16, lora_alpha=32) or the class's own defaults."""
    default = spec.train_default or spec.config_cls
    help = f"{spec.label} settings, used with method: {name} ({spec.config_cls.__name__} fields)"
    return name, spec.config_cls, field(default_factory=default, metadata={"help": help})


# The settings plus one section per registered method, so a method added to the registry is
# configurable here (YAML, --NAME.FIELD options, help) without an edit to this file.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [_section(name, spec) for name, spec in METHODS.items()],
    bases=(_Settings,),
    frozen=True,
)
TrainConfig.__module__, TrainConfig.__doc__ = __name__, _Settings.__doc__


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) with dotted-key overrides on top (e.g. {"lora.r": 8})."""
    data = resolve_file_paths(read_config_file(path), path) if path is not None else {}
    for section in METHODS:
        if not isinstance(data.get(section, {}), dict):
            kind = METHODS[section].config_cls.__name__
            raise ConfigError(f"{section} must be a mapping of {kind} fields, found {_short(data[section])}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {part} is not a mapping")
        node[leaf] = value
    # A method's section changes its defaults (lora: {r: 8} keeps the default lora_alpha); the method's
    # own replace() re-derives what depends on the changed keys (a bottleneck's placement -> targets).
    defaults = TrainConfig()
    for section in METHODS:
        if isinstance(data.get(section), dict):
            data[section] = _section(getattr(defaults, section), data[section], section)
    return build(TrainConfig, data)


def _section(default: Any, changes: dict[str, Any], section: str) -> Any:
    try:
        if not all(isinstance(k, str) for k in changes):
            type(default).from_dict(changes)  # raises the method's own error, naming the key
        return default.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"{section}: {e}") from None


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (every key, defaults included; local paths absolute, so the
    file reruns from any working directory)."""
    from ..io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(absolute_paths(config.to_dict()), sort_keys=False), encoding="utf-8")


_NON_BLANK = {
    "base": "a built-in model name, a model directory or a hub id, e.g. 'smollm2-135m'",
    "data": "a data file or 'task:NAME', e.g. 'task:dates'",
    "val_data": "a data file or 'task:NAME', or null to split val_fraction off data",
}
_OUTPUT_DIR_FIELDS = ("task", "method")


def _check_output_dir(template: str) -> None:
    """output_dir is filled in with str.format(task=..., method=...) once the data is known; a bad
    placeholder must fail here, before the base model loads, not as a KeyError after."""
    fix = "write a literal brace as {{ or }}"
    _require(template.strip() != "", "output_dir", template, "a directory, e.g. 'runs/{task}-{method}'")
    try:
        fields_used = [
            (n, spec, conv) for _, n, spec, conv in string.Formatter().parse(template) if n is not None
        ]
    except ValueError as e:  # an unmatched brace
        raise ConfigError(f"invalid value for output_dir: {_short(template)} ({e}); {fix}") from None
    for name, spec, conv in fields_used:
        # Only plain {task} and {method}: {task!r} would quote the name, {task:>300} pad it.
        if name not in _OUTPUT_DIR_FIELDS or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(
                f"invalid value for output_dir: {_short(template)} has the placeholder {shown}; only plain "
                f"{{task}} and {{method}} are filled in ({fix})"
            )


def field_help() -> dict[str, str]:
    """{dotted key: help} for every field, each method's section included (for the CLI and the docs)."""
    out = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig) if f.name not in METHODS}
    for section, spec in METHODS.items():
        out.update({f"{section}.{k}": v for k, v in spec.config_cls.field_docs().items()})
    return out


def field_defaults() -> dict[str, Any]:
    """{dotted key: default} for every field, as `field_help` names them (a method's section: the
    defaults training gives it, e.g. LoRA's r=16 and lora_alpha=32)."""
    out: dict[str, Any] = {}
    for key, value in TrainConfig().to_dict().items():
        if key in METHODS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
