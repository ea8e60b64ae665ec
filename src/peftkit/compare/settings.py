"""How `peftkit compare` scores the variants: the experiment file's `evaluate:` section, checked.

    evaluate:
      data: task:dates          # what the score is measured on (default: the training data's task)
      examples: 100             # test examples scored per model
      forgetting_tasks: [sentiment, extract]   # default: every other built-in task
      forgetting_examples: 50
      general_text: null        # a UTF-8 text file; null: the shipped public-domain sample
      general_text_chars: null  # only the first N characters of it (null: all)

Every key has a default; an unknown key is refused by name with a suggestion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.source import parse_task_spec
from ..data.tasks import TASKS, get_task
from ..errors import ConfigError, DataError, did_you_mean
from ..eval.metrics import METRICS
from ..values import short_repr

GENERAL_TEXT = "persuasion-ch1-2.txt"  # in peftkit/data/general_text, with its source and licence
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EvalSettings:
    """The `evaluate:` keys, each with its default; `resolve` fills in what depends on the experiment."""

    data: str | None = None  # task:NAME (its test split) or a JSONL/JSON/CSV file; None: the training task
    metric: str = "auto"  # auto: the task's own metric; exact_match for a file
    examples: int = 100  # examples scored per model (the first N)
    max_new_tokens: int = 0  # tokens generated per answer; 0: the task's (a file: longest answer + 8)
    forgetting_tasks: tuple[str, ...] | None = None  # built-in tasks; None: every one but the scored task
    forgetting_examples: int = 50  # test examples per forgetting task
    general_text: str | None = None  # a UTF-8 text file; None: the shipped sample (see GENERAL_TEXT)
    general_text_chars: int | None = None  # use only the first N characters of the text
    window: int = 128  # tokens per general-text row (the text is cut into windows this long)
    batch_size: int = 16  # rows per generate call / forward pass
    dtype: str = "auto"  # the dtype the models are loaded in (auto: the checkpoint's own)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["forgetting_tasks"] = list(self.forgetting_tasks or [])
        return out


def read_settings(section: dict[str, Any], training_data: str) -> EvalSettings:
    """The checked settings of an `evaluate:` section, with the scored data and forgetting tasks
    resolved (`training_data` is the shared config's `data`)."""
    known = [f.name for f in fields(EvalSettings)]
    for key in section:
        if key not in known:
            raise ConfigError(
                f"evaluate: unknown key {key!r}{did_you_mean(key, known)}; valid: {', '.join(known)}"
            )
    values = dict(section)
    if isinstance(values.get("forgetting_tasks"), list):
        values["forgetting_tasks"] = tuple(values["forgetting_tasks"])
    for f in fields(EvalSettings):
        if f.name in values:
            _check_type(f.name, values[f.name], f.default)
    settings = EvalSettings(**values)
    _check_ranges(settings)
    data = settings.data or _default_data(training_data)
    task = _task_of(data)
    metric = settings.metric
    if metric == "auto":
        metric = task.metric if task else "exact_match"
    elif metric not in METRICS:
        raise ConfigError(f"evaluate.metric {metric!r}{did_you_mean(metric, list(METRICS))}; valid: auto, "
                          + ", ".join(METRICS))  # fmt: skip
    forgetting = settings.forgetting_tasks
    if forgetting is None:
        forgetting = tuple(t for t in TASKS if task is None or t != task.name)
    forgetting = tuple(_forgetting_task(t) for t in forgetting)
    if settings.general_text is not None and not Path(settings.general_text).expanduser().is_file():
        raise ConfigError(f"evaluate.general_text: no such file: {settings.general_text}")
    return dataclasses.replace(settings, data=data, metric=metric, forgetting_tasks=forgetting)


def _check_type(name: str, value: Any, default: Any) -> None:
    ints = ("examples", "max_new_tokens", "forgetting_examples", "window", "batch_size", "general_text_chars")
    if name in ints:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (value is None and default is None)
        what = "an integer" + (" or null" if default is None else "")
    elif name == "forgetting_tasks":
        ok = value is None or (isinstance(value, tuple) and all(isinstance(t, str) for t in value))
        what = "a list of built-in task names, e.g. [sentiment, extract]"
    else:
        ok = isinstance(value, str) or (value is None and default is None)
        what = "text" + (" or null" if default is None else "")
    if not ok:
        raise ConfigError(f"evaluate.{name} must be {what}, found {short_repr(value)}")


def _check_ranges(s: EvalSettings) -> None:
    for name, least in (("examples", 1), ("forgetting_examples", 1), ("window", 8), ("batch_size", 1)):
        if getattr(s, name) < least:
            raise ConfigError(f"evaluate.{name} must be at least {least}, got {getattr(s, name)}")
    if s.max_new_tokens < 0:
        raise ConfigError(f"evaluate.max_new_tokens must be >= 0 (0: auto), got {s.max_new_tokens}")
    if s.general_text_chars is not None and s.general_text_chars < 100:
        raise ConfigError(f"evaluate.general_text_chars must be at least 100, got {s.general_text_chars}")
    if s.dtype not in DTYPES:
        raise ConfigError(
            f"evaluate.dtype {s.dtype!r}{did_you_mean(s.dtype, DTYPES)}; valid: {', '.join(DTYPES)}"
        )


def _default_data(training_data: str) -> str:
    task = _task_of(training_data)
    if task is None:
        raise ConfigError(
            f"the training data {training_data!r} is a file, so compare cannot tell what to score: set "
            "evaluate.data to a built-in task (task:NAME) or to a file of held-out examples (and "
            "evaluate.metric, default exact_match)"
        )
    return f"task:{task.name}"


def _task_of(data: str) -> Any:
    """The built-in task `data` names (task:NAME[:SPLIT]), else None (a file, which must exist)."""
    try:
        spec = parse_task_spec(data)
    except DataError as e:
        raise ConfigError(f"evaluate.data: {e}") from None
    if spec is None and not Path(data).expanduser().exists():
        raise ConfigError(f"evaluate.data {data!r}: no such file; give task:NAME or a dataset file")
    return None if spec is None else spec[0]


def _forgetting_task(name: str) -> str:
    bare = name.removeprefix("task:")
    try:
        return get_task(bare).name
    except DataError as e:
        raise ConfigError(f"evaluate.forgetting_tasks: {e}") from None


def general_text(settings: EvalSettings) -> str:
    """The general text forgetting is measured on (the shipped sample unless a file is named)."""
    if settings.general_text is None:
        text = resources.files("peftkit.data").joinpath("general_text", GENERAL_TEXT).read_text("utf-8")
    else:
        path = Path(settings.general_text).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"evaluate.general_text {path} is not UTF-8 text") from None
    text = text if settings.general_text_chars is None else text[: settings.general_text_chars]
    if not text.strip():
        raise DataError("the general text is empty")
    return text
