"""Tune's objective `score`: a trained trial's task metric on its own validation examples.

Never the test split: the examples are exactly the ones training validated on (the share split off
`data`, or `val_data`), so the numbers a user reports on the test split stay untouched by the search.
The experiment's `evaluate:` section may set `examples` (the first N validation examples; default all),
`metric` (default: the task's, else exact_match), `max_new_tokens` and `batch_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..train.config import FULL, TrainConfig

EVALUATE_KEYS = ("examples", "metric", "max_new_tokens", "batch_size")


def check_evaluation(evaluation: dict[str, Any], config: TrainConfig) -> None:
    """Refuse `evaluate:` settings tune cannot use, before anything trains."""
    from ..eval.metrics import get_metric

    for key in ("examples", "max_new_tokens", "batch_size"):
        value = evaluation.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"evaluate.{key} must be an integer >= 1, got {value!r}")
    if evaluation.get("metric") is not None:
        get_metric(evaluation["metric"])
    if evaluation.get("split") not in (None, "validation", "val"):
        raise ConfigError(
            f"evaluate.split is {evaluation['split']!r}, but tune scores only validation examples (never the "
            "test split, which the search must not see); remove evaluate.split for tune"
        )
    if config.val_data is None and config.val_fraction == 0:
        raise ConfigError("objective score needs validation examples: set val_fraction > 0 or val_data")


def validation_score(config: TrainConfig, summary: dict[str, Any], evaluation: dict[str, Any]) -> float:
    """The task metric of the run's result (adapter-best, else adapter-last) on its validation examples."""
    import torch

    from ..adapted import AdaptedModel
    from ..base import load_base
    from ..data.source import parse_task_spec
    from ..eval.commands import longest_answer
    from ..eval.run import evaluate
    from ..train.setup import _examples  # the very split training validated on

    examples = _examples(config)[1][: evaluation.get("examples")]
    if not examples:
        raise ConfigError(f"objective score: {config.data} gave no validation examples to score")
    task = parse_task_spec(config.val_data or config.data)
    metric = evaluation.get("metric") or (task[0].metric if task else "exact_match")
    dtype = torch.bfloat16 if summary.get("precision") == "bf16" else torch.float32
    result = Path(summary["output"])
    if config.method == FULL:
        model, tokenizer = load_base(str(result), dtype=dtype)
        names: list[str | None] = [None]
    else:
        base, tokenizer = load_base(
            config.base, dtype=dtype, **({"quantize": config.quantize} if config.quantize else {})
        )
        model = AdaptedModel(base)
        model.load_adapter(result, "trial")
        names = ["trial"]
    max_new = evaluation.get("max_new_tokens") or (
        task[0].max_new_tokens if task else longest_answer(tokenizer, examples) + 8
    )
    report = evaluate(
        model, tokenizer, examples, metric=metric, adapters=names, max_new_tokens=max_new,
        batch_size=evaluation.get("batch_size", 16), with_perplexity=False, samples=0,
    )  # fmt: skip
    return report.results[0].score
