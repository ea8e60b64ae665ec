"""How `peftkit compare` scores the variants: the experiment file's `evaluate:` section, resolved.

The keys, their checks and defaults are peftkit.experiment.evaluation's (tune reads the same schema);
compare uses them all:

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
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.tasks import TASKS, get_task
from ..errors import ConfigError, DataError
from ..experiment.evaluation import EvalSettings, metric_for, read_evaluation, scored_task

__all__ = ["GENERAL_TEXT", "EvalSettings", "general_text", "read_settings"]

GENERAL_TEXT = "persuasion-ch1-2.txt"  # in peftkit/data/general_text, with its source and licence
EXAMPLES = 100  # test examples scored per model when evaluate.examples is not set


def read_settings(section: dict[str, Any], training_data: str) -> EvalSettings:
    """The checked settings of an `evaluate:` section (peftkit.experiment.evaluation's schema), with
    the scored data, metric, examples and forgetting tasks resolved (`training_data` is the shared
    config's `data`)."""
    settings = read_evaluation(section)
    data = settings.data or _default_data(training_data)
    task = _task_of(data)
    forgetting = settings.forgetting_tasks
    if forgetting is None:
        forgetting = tuple(t for t in TASKS if task is None or t != task.name)
    forgetting = tuple(_forgetting_task(t) for t in forgetting)
    if settings.general_text is not None and not Path(settings.general_text).expanduser().is_file():
        raise ConfigError(f"evaluate.general_text: no such file: {settings.general_text}")
    examples = EXAMPLES if settings.examples is None else settings.examples
    return dataclasses.replace(settings, data=data, metric=metric_for(settings.metric, data), examples=examples,
                               forgetting_tasks=forgetting)  # fmt: skip


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
    task = scored_task(data)
    if task is None and not Path(data).expanduser().exists():
        raise ConfigError(f"evaluate.data {data!r}: no such file; give task:NAME or a dataset file")
    return task


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
