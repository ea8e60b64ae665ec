"""Tune's objective `score`: a trained trial's task metric on its own validation examples.

Never the test split: the examples are exactly the ones training validated on (the share split off
`data`, or `val_data`), so the numbers a user reports on the test split stay untouched by the search.
The experiment's `evaluate:` section (peftkit.experiment.evaluation, compare's schema too) sets, for
tune: `examples` (the first N validation examples; default all), `metric` (auto: the task's, else
exact_match), `max_new_tokens` (0: the task's) and `batch_size`. Compare's other keys (data,
forgetting_*, general_text*, window, dtype) are accepted, so one file serves both, and said unused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..experiment.evaluation import max_new_tokens_for, metric_for, read_evaluation, unused_by
from ..train.config import FULL, TrainConfig


def check_evaluation(
    evaluation: dict[str, Any], config: TrainConfig, objective: str, log: Callable[[str], None]
) -> None:
    """Refuse `evaluate:` settings tune cannot use, before anything trains (an unknown key whatever the
    objective), and say which keys it does not use."""
    read_evaluation(evaluation)
    if objective != "score":
        if evaluation:
            log("evaluate: not used by --objective val_loss (it sets how --objective score scores trials)")
        return
    if config.val_data is None and config.val_fraction == 0:
        raise ConfigError("objective score needs validation examples: set val_fraction > 0 or val_data")
    if unused := unused_by(evaluation, "tune"):
        log(f"evaluate: {', '.join(unused)} are compare's keys; tune scores each trial on its validation "
            "examples, so they are not used here")  # fmt: skip


def validation_score(config: TrainConfig, summary: dict[str, Any], evaluation: dict[str, Any]) -> float:
    """The task metric of the run's result (adapter-best, else adapter-last) on its validation examples."""
    import torch

    from ..base.precision import PRECISION_ADVICE
    from ..eval.run import evaluate
    from ..tools.opening import open_model
    from ..train.setup import _examples  # the very split training validated on

    settings = read_evaluation(evaluation)
    examples = _examples(config)[1][: settings.examples]
    if not examples:
        raise ConfigError(f"objective score: {config.data} gave no validation examples to score")
    data = config.val_data or config.data
    dtype = torch.bfloat16 if summary.get("precision") == "bf16" else torch.float32
    result = Path(summary["output"])
    options = {"dtype": dtype, "dtype_advice": PRECISION_ADVICE}
    if config.method == FULL:
        opened = open_model(str(result), **options)
        names: list[str | None] = [None]
    else:
        opened = open_model(config.base, [("trial", result)], quantize=config.quantize or None, **options)
        names = ["trial"]
    model, tokenizer = opened.model, opened.tokenizer
    report = evaluate(
        model, tokenizer, examples, metric=metric_for(settings.metric, data), adapters=names,
        max_new_tokens=max_new_tokens_for(settings.max_new_tokens, data, tokenizer, examples),
        batch_size=settings.batch_size, with_perplexity=False, samples=0,
    )  # fmt: skip
    return report.results[0].score
