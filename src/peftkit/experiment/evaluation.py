"""The `evaluate:` section of an experiment file: one schema, read the same way by compare and tune.

    evaluate:
      metric: auto              # both: the task's own metric (exact_match for a file)
      examples: 100             # both: examples scored per model (compare: 100 test examples; tune: all
                                #   of a trial's validation examples)
      max_new_tokens: 0         # both: tokens generated per answer; 0: the task's (a file: longest answer + 8)
      batch_size: 16            # both: rows per generate call / forward pass
      data: task:dates          # compare: what is scored (default: the training task's test split)
      forgetting_tasks: [sentiment, extract]   # compare (default: every other built-in task)
      forgetting_examples: 50   # compare
      general_text: null        # compare: a UTF-8 text file; null: the shipped public-domain sample
      general_text_chars: null  # compare: only the first N characters of it (null: all)
      window: 128               # compare: tokens per general-text row
      dtype: auto               # compare: the dtype the models are loaded in (auto: bf16 where native)

Every key is optional; an unknown one is refused by name with a suggestion, by both commands. Tune
scores a trial on its own validation examples, never on `data`, so compare's keys are noted there as
unused (see `unused_by`). `metric_for` and `max_new_tokens_for` resolve `auto` and 0 for both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError, DataError, did_you_mean
from ..values import short_repr

DTYPES = ("auto", "float32", "bfloat16", "float16")
USED_BY = {
    "tune": ("metric", "examples", "max_new_tokens", "batch_size"),
    "compare": ("metric", "examples", "max_new_tokens", "batch_size", "data", "forgetting_tasks",
                "forgetting_examples", "general_text", "general_text_chars", "window", "dtype"),
}  # fmt: skip
"""The keys each command uses; the others are accepted (a file serves both) and noted as unused."""


DTYPE_ADVICE = "set evaluate: {dtype: auto} (or float32)"
"""How a compare user chooses float32 instead of a dtype this machine does not compute natively."""


@dataclass(frozen=True)
class EvalSettings:
    """The `evaluate:` keys, each with its default (see the module docstring for who uses which)."""

    data: str | None = None  # task:NAME (its test split) or a JSONL/JSON/CSV file; None: the training task
    metric: str = "auto"  # auto: the task's own metric; exact_match for a file
    examples: int | None = None  # examples scored per model (the first N); None: the command's default
    max_new_tokens: int = 0  # tokens generated per answer; 0: the task's (a file: longest answer + 8)
    forgetting_tasks: tuple[str, ...] | None = None  # built-in tasks; None: every one but the scored task
    forgetting_examples: int = 50  # test examples per forgetting task
    general_text: str | None = None  # a UTF-8 text file; None: the shipped sample
    general_text_chars: int | None = None  # use only the first N characters of the text
    window: int = 128  # tokens per general-text row (the text is cut into windows this long)
    batch_size: int = 16  # rows per generate call / forward pass
    dtype: str = "auto"  # the dtype the models are loaded in (auto: bf16 where native, else float32)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["forgetting_tasks"] = list(self.forgetting_tasks or [])
        return out


def read_evaluation(section: dict[str, Any] | None) -> EvalSettings:
    """The checked keys of an `evaluate:` section: names, types and ranges, and the metric's name.
    What depends on the data (auto metric, the default data) is each command's to resolve."""
    section = section or {}
    known = [f.name for f in fields(EvalSettings)]
    for key in section:
        if key == "split":
            raise ConfigError(
                "evaluate.split is not a key: compare scores the test split of evaluate.data, tune each "
                "trial's validation examples (never the test split, which the search must not see); remove it"
            )
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
    return settings


def unused_by(section: dict[str, Any] | None, command: str) -> list[str]:
    """The keys of `section` that `command` does not use (in the section's order)."""
    return [key for key in section or {} if key not in USED_BY[command]]


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
    from ..eval.metrics import METRICS

    for name, least in (("examples", 1), ("forgetting_examples", 1), ("window", 8), ("batch_size", 1)):
        if getattr(s, name) is not None and getattr(s, name) < least:
            raise ConfigError(f"evaluate.{name} must be at least {least}, got {getattr(s, name)}")
    if s.max_new_tokens < 0:
        raise ConfigError(f"evaluate.max_new_tokens must be >= 0 (0: auto), got {s.max_new_tokens}")
    if s.general_text_chars is not None and s.general_text_chars < 100:
        raise ConfigError(f"evaluate.general_text_chars must be at least 100, got {s.general_text_chars}")
    if s.dtype not in DTYPES:
        raise ConfigError(
            f"evaluate.dtype {s.dtype!r}{did_you_mean(s.dtype, DTYPES)}; valid: {', '.join(DTYPES)}"
        )
    if s.metric != "auto" and s.metric not in METRICS:
        raise ConfigError(f"evaluate.metric {s.metric!r}{did_you_mean(s.metric, list(METRICS))}; valid: auto, "
                          + ", ".join(METRICS))  # fmt: skip


def scored_task(data: str) -> Any:
    """The built-in task `data` names (task:NAME[:SPLIT]), else None (a file)."""
    from ..data.source import parse_task_spec

    try:
        spec = parse_task_spec(data)
    except DataError as e:
        raise ConfigError(f"evaluate.data: {e}") from None
    return None if spec is None else spec[0]


def metric_for(metric: str, data: str) -> str:
    """`metric`, with auto resolved: the task's own metric for task:NAME data, exact_match for a file."""
    if metric != "auto":
        return metric
    task = scored_task(data)
    return task.metric if task else "exact_match"


def max_new_tokens_for(requested: int, data: str, tokenizer: Any, examples: list) -> int:
    """`requested`, with 0 resolved: the task's own budget for task:NAME data; for a file, the longest
    answer among `examples` (in tokens) + 8."""
    if requested:
        return requested
    task = scored_task(data)
    if task is not None:
        return task.max_new_tokens
    from ..eval.loading import longest_answer

    return longest_answer(tokenizer, examples) + 8
