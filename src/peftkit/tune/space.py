"""The search space: the `search:` section of an experiment file, parsed, checked and sampled.

    search:
      lr: {low: 1e-4, high: 3e-3, log: true}     # a range: float, or int for an int key (step: 2)
      lora.r: [4, 8, 16, 32]                      # a list: categorical choices
      lora.alpha_over_r: [1, 2]                   # derived: lora_alpha = this x r
      lora.lora_dropout: {low: 0.0, high: 0.1}
      lora.target_modules: [all-linear, [q_proj, v_proj]]
      method: [lora, ia3]                         # method sections are sampled only when chosen
      ia3: {target_modules: [[k_proj, v_proj]]}   # a section's keys may also be nested

Every key is checked against the training config before anything trains: each range end and each
choice is built into a config, so a typo or an impossible value fails at once, by name.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..experiment import Experiment
from ..methods import METHODS
from ..train.config import FULL, TrainConfig
from ..values import number_from_text, short_repr

ALPHA_OVER_R = "alpha_over_r"
"""A derived key under a LoRA-style section: lora_alpha = alpha_over_r x r (the scale stays put as r moves)."""

RANGE_KEYS = {"low", "high", "log", "step"}

NOT_SEARCHED = {
    "output_dir": "each trial trains in OUT/trials/N (best.yaml: OUT/best)",
    "progress": "trials run without a progress bar (best.yaml keeps your setting)",
    "tensorboard": "trials run without TensorBoard (best.yaml keeps your setting)",
    "eval_every": "the pruners compare trials at the same validation steps",
    "val_data": "trials are compared on the same validation examples",
    "val_fraction": "trials are compared on the same validation examples",
}
"""Training keys a search may not vary, and why: a trial sets them itself, or varying them would make
trials incomparable. A fixed value belongs among the shared keys."""

DEFAULT_SEARCH: dict[str, dict[str, Any]] = {
    "lora": {
        "lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "lora.r": [4, 8, 16, 32],
        "lora.alpha_over_r": [1, 2],
        "lora.lora_dropout": {"low": 0.0, "high": 0.1},
    },
    FULL: {"lr": {"low": 1e-6, "high": 1e-4, "log": True}},
}
"""The ranges searched when the file has no `search:` section, by the shared config's method; any other
method searches lr over OTHER_LR. Target modules are left out: their names depend on the model."""
OTHER_LR = {"lr": {"low": 1e-4, "high": 3e-2, "log": True}}


@dataclass(frozen=True)
class Param:
    """One searched key. `choices` are the config values; optuna sees `labels` (plain scalars)."""

    key: str  # dotted training key, e.g. "lr", "lora.r", or "lora.alpha_over_r"
    kind: str  # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    labels: tuple[Any, ...] = ()

    @property
    def section(self) -> str | None:
        """The method section the key belongs to (sampled only when that method is used), else None."""
        head, dot, _ = self.key.partition(".")
        return head if dot and head in METHODS else None

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}: one of {', '.join(map(str, self.labels))}"
        scale = ", log scale" if self.log else ""
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.key}: {self.kind} in [{self.low}, {self.high}]{scale}{step}"

    def value_of(self, label: Any) -> Any:
        """The config value of what optuna suggested."""
        return self.choices[self.labels.index(label)] if self.kind == "choice" else label

    def label_of(self, value: Any) -> Any:
        """What optuna is told for a config value (a variant's), or a ConfigError if it is not in range."""
        if self.kind == "choice":
            for choice, label in zip(self.choices, self.labels, strict=True):
                if _same(choice, value):
                    return label
            raise ConfigError(f"{self.key}={short_repr(value)} is not among the choices {list(self.labels)}")
        value = number_from_text(value)  # YAML reads 1e-2 as text, as in the ranges
        if not _number(value) or (self.kind == "int" and not float(value).is_integer()):
            wanted = "an integer" if self.kind == "int" else "a number"
            raise ConfigError(
                f"{self.key}={short_repr(value)} is not {wanted} (the search has a range for it)"
            )
        if not self.low <= value <= self.high:
            raise ConfigError(
                f"{self.key}={short_repr(value)} is outside the searched range [{self.low}, {self.high}]"
            )
        return int(value) if self.kind == "int" else float(value)


def parse_space(experiment: Experiment) -> list[Param]:
    """The experiment's search space (its `search:` section, or the defaults for its method), checked."""
    search = experiment.search
    if search is None:
        method = experiment.config().method
        search = DEFAULT_SEARCH.get(method, OTHER_LR)
    for key in _dotted(search):
        _check_key(key)
    params = [_param(key, spec) for key, spec in _dotted(search).items()]
    if not params:
        raise ConfigError(
            "search is empty; name at least one key to search, e.g. lr: {low: 1e-4, high: 3e-3}"
        )
    check_space(params, experiment)
    return params


def default_search_text() -> str:
    """The default ranges, as YAML-ish lines (for --help and the docs)."""
    lines = [f"{method}: {json.dumps(spec)}" for method, spec in DEFAULT_SEARCH.items()]
    return "\n".join([*lines, f"other methods: {json.dumps(OTHER_LR)}"])


def _dotted(search: dict[str, Any]) -> dict[str, Any]:
    """{"lora": {"r": [4, 8]}} -> {"lora.r": [4, 8]}; a range mapping ({low, high}) stays one value."""
    out: dict[str, Any] = {}
    for key, spec in search.items():
        nested = isinstance(spec, dict) and key in METHODS and not set(spec) & RANGE_KEYS
        for sub, value in spec.items() if nested else [(None, spec)]:
            name = f"{key}.{sub}" if sub is not None else key
            if name in out:
                raise ConfigError(f"search names {name} twice; keep one")
            out[name] = value
    return out


def _check_key(key: str) -> None:
    """Refuse a key the training config does not have, naming the valid ones."""
    head, _, leaf = key.rpartition(".")
    if head and head not in METHODS:
        raise ConfigError(f"search {key}: {head!r} is no method section{did_you_mean(head, METHODS)}; "
                          f"sections: {', '.join(METHODS)}")  # fmt: skip
    if key in NOT_SEARCHED:
        raise ConfigError(f"search {key}: not a key to search ({NOT_SEARCHED[key]}); set it among the "
                          "shared keys, outside search")  # fmt: skip
    cls = METHODS[head].config_cls if head else TrainConfig
    valid = [f.name for f in fields(cls) if f.name not in METHODS]
    valid += [ALPHA_OVER_R] if head and _has_alpha(head) else []
    if leaf not in valid:
        raise ConfigError(f"search {key}: unknown key{did_you_mean(leaf, valid)}; valid keys"
                          f"{' under ' + head if head else ''}: {', '.join(valid)}")  # fmt: skip


def _param(key: str, spec: Any) -> Param:
    where = f"search {key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: the list of choices is empty; give at least one value")
        labels = tuple(_label(c) for c in spec)
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}: a choice is listed twice ({list(labels)}); keep one of each")
        return Param(key, "choice", choices=tuple(spec), labels=labels)
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: {short_repr(spec)} is neither a range {{low: .., high: ..}} nor a list of choices; "
            "a fixed value belongs among the shared keys, outside search"
        )
    unknown = set(spec) - RANGE_KEYS
    if unknown or not {"low", "high"} <= set(spec):
        raise ConfigError(f"{where}: a range takes low, high and optionally log and step, got {sorted(spec)}")
    # YAML 1.1 reads 1e-4 as text; the config's own keys accept it, so the ranges do too.
    low, high, step = (number_from_text(spec.get(k)) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    kind = _kind(key)
    for name, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _number(value) or (kind == "int" and not isinstance(value, int)):
            wanted = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{where}: {name} must be {wanted} ({key} is {kind}), got {short_repr(value)}")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high}); for one value use [{low}]")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {short_repr(log)}")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{where}: a log-scale range needs low > 0 and no step (low is {low})")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be > 0, got {step}")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _kind(key: str) -> str:
    """ "int" or "float" for a numeric key; other keys take only choices."""
    head, _, leaf = key.rpartition(".")
    if leaf == ALPHA_OVER_R:
        return "float"
    cls = METHODS[head].config_cls if head in METHODS else TrainConfig
    hint = typing.get_type_hints(cls).get(leaf)
    numeric = {a for a in typing.get_args(hint) or (hint,) if a in (int, float)}
    if hint is None or head and head not in METHODS:
        return "float"  # an unknown key: check_space names it with the config's own message
    if not numeric:
        raise ConfigError(f"search {key}: a range needs a numeric key; give {key} a list of choices")
    return "float" if float in numeric else "int"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(choice: Any) -> Any:
    """Optuna takes None, bool, int, float and str as choices; a list becomes its JSON text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return json.dumps(choice, separators=(",", ":"))


def _same(a: Any, b: Any) -> bool:
    return _label(a) == _label(b) and type(a) is type(b) or (_number(a) and _number(b) and a == b)


def check_space(params: list[Param], experiment: Experiment) -> None:
    """Build a config at every range end and every choice (the rest as shared), so a bad key or value
    fails now. A method section's keys are built with that method; one no trial can use is refused."""
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"search names a key twice: {keys}")
    shared_method = experiment.config().method
    methods = next((p.choices for p in params if p.key == "method"), (shared_method,))
    for p in params:
        if p.section is not None and p.section not in methods:
            raise ConfigError(
                f"search {p.key}: no trial uses method {p.section} (method is {shared_method}); "
                f"add method: [{shared_method}, {p.section}] to search, or set method: {p.section}"
            )
        if p.key.endswith("." + ALPHA_OVER_R) and not _has_alpha(p.section):
            raise ConfigError(
                f"search {p.key}: {ALPHA_OVER_R} applies to sections with r and lora_alpha (lora)"
            )
        if p.key.endswith("." + ALPHA_OVER_R) and f"{p.section}.lora_alpha" in keys:
            raise ConfigError(
                f"search names both {p.section}.lora_alpha and {p.key}, which sets lora_alpha = ratio x r; "
                "search one of them"
            )
        for value in p.choices if p.kind == "choice" else (p.low, p.high):
            overrides = {p.key: value} | ({"method": p.section} if p.section else {})
            try:
                experiment.config(resolve(overrides, experiment))
            except ConfigError as e:
                raise ConfigError(f"search {p.key}: the value {short_repr(value)} fails: {e}") from None


def _has_alpha(section: str | None) -> bool:
    if section is None:
        return False
    names = typing.get_type_hints(METHODS[section].config_cls)
    return "r" in names and "lora_alpha" in names


def suggest(trial: Any, params: list[Param], shared_method: str) -> dict[str, Any]:
    """One trial's training overrides (dotted keys), sampled from `params` through optuna's `trial`.
    `method` first: a section's keys are sampled only when the trial uses that method."""
    chosen: dict[str, Any] = {}
    ordered = sorted(params, key=lambda p: p.key != "method")
    for p in ordered:
        method = chosen.get("method", shared_method)
        if p.section is not None and p.section != method:
            continue
        if p.kind == "choice":
            chosen[p.key] = p.value_of(trial.suggest_categorical(p.key, list(p.labels)))
        elif p.kind == "int":
            chosen[p.key] = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            chosen[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return chosen


def resolve(chosen: dict[str, Any], experiment: Experiment) -> dict[str, Any]:
    """Training overrides from sampled values: SECTION.alpha_over_r becomes SECTION.lora_alpha = ratio x r
    (r sampled, else the shared config's)."""
    out = dict(chosen)
    for key in [k for k in chosen if k.endswith("." + ALPHA_OVER_R)]:
        section = key.split(".")[0]
        ratio = out.pop(key)
        r = out.get(f"{section}.r", getattr(experiment.config(), section).r)
        out[f"{section}.lora_alpha"] = float(ratio * r)
    return out
