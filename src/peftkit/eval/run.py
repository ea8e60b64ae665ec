"""Evaluation runs: the base model and several adapters scored on the same examples, side by side.

By default every (example, adapter) pair is a row of the same mixed batches, each row routed through
its own adapter in one `generate` call (`peftkit.eval.generation`). At a fixed batch size that is as
many calls as evaluating the adapters one by one, but batches stay full when there are many
adapters and few examples (8 adapters x 4 examples: 2 calls of 16 rows, not 8 calls of 4).

    report = evaluate(am, tok, task.examples("test", 100), metric="exact_match",
                      adapters=[None, "dates"], max_new_tokens=16)
    print(format_table(report))
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from peftkit.core.rows import BASE
from peftkit.data.example import Example
from peftkit.errors import RequestError
from peftkit.eval.generation import answer_nll, generate_answers, perplexity, ppl_of
from peftkit.eval.metrics import check_references, get_metric

__all__ = [
    "AdapterResult",
    "EvalReport",
    "Sample",
    "evaluate",
    "format_table",
    "generate_answers",
    "perplexity",
]


@dataclass(frozen=True)
class Sample:
    prompt: str  # the last user turn
    reference: str
    prediction: str


@dataclass
class AdapterResult:
    """One adapter's (or the base model's) scores on the examples."""

    adapter: str  # the adapter's name, or "base" for the base model
    score: float  # the metric's mean over the examples
    perplexity: float | None  # exp(mean NLL of the reference answers' tokens); None if not measured
    n: int
    seconds: float  # its own run, or its share (by rows) of the mixed batches' time
    predictions: list[str] = field(repr=False)
    samples: list[Sample] = field(default_factory=list)
    trained_on: int | None = None  # how many of the examples it was trained on, when known (eval/heldout.py)


@dataclass
class EvalReport:
    metric: str
    results: list[AdapterResult]
    seconds: float  # wall time of the whole evaluation
    mixed: bool  # whether the adapters shared mixed batches

    def __getitem__(self, adapter: str) -> AdapterResult:
        return next(r for r in self.results if r.adapter == adapter)

    def to_dict(self, predictions: bool = False) -> dict[str, Any]:
        results = [asdict(r) for r in self.results]
        for r in results if not predictions else ():
            r.pop("predictions")
        return {"metric": self.metric, "seconds": self.seconds, "mixed": self.mixed, "results": results}


# -- evaluate ------------------------------------------------------------------------------------
def evaluate(
    model_or_adapted: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    metric: str,
    adapters: Sequence[str | None],
    max_new_tokens: int,
    batch_size: int = 16,
    with_perplexity: bool = True,
    mixed: bool = True,
    samples: int = 3,
) -> EvalReport:
    """Score each adapter (None = the base model) on the same examples with `metric`.

    mixed=True puts every (example, adapter) pair in the same mixed batches (one generate call per
    batch, rows routed to their adapters); mixed=False runs the adapters one after the other (their
    own timings; the same answers up to floating-point rounding of the different padding).
    """
    score = get_metric(metric)
    check_references(metric, [ex.answer for ex in examples])
    adapters = list(adapters) or [None]
    labels = [BASE if a is None else a for a in adapters]
    if len(set(labels)) != len(labels):
        raise RequestError(f"adapters must be distinct (None is {BASE!r}): {labels}")
    n, k = len(examples), len(adapters)
    t0 = time.perf_counter()
    if mixed:  # rows example-major: an example's K rows have the same length, so they share a batch
        rows = [ex for ex in examples for _ in adapters]
        names = [a for _ in examples for a in adapters]
        preds, nll = _run(
            model_or_adapted, tokenizer, rows, names, max_new_tokens, batch_size, with_perplexity
        )
        per = {
            a: (preds[j::k], nll[j::k] if nll else [], (time.perf_counter() - t0) / k)
            for j, a in enumerate(adapters)
        }
    else:
        per = {}
        for a in adapters:
            t1 = time.perf_counter()
            preds, nll = _run(
                model_or_adapted, tokenizer, examples, [a] * n, max_new_tokens, batch_size, with_perplexity
            )
            per[a] = (preds, nll, time.perf_counter() - t1)
    results = []
    for a, label in zip(adapters, labels, strict=True):
        preds, nll, seconds = per[a]
        scores = [score(p, ex.answer) for p, ex in zip(preds, examples, strict=True)]
        results.append(
            AdapterResult(
                adapter=label,
                score=sum(scores) / n if n else math.nan,
                perplexity=ppl_of(nll) if with_perplexity else None,
                n=n,
                seconds=seconds,
                predictions=preds,
                samples=[
                    Sample(_last_user(ex), ex.answer, p)
                    for ex, p in zip(examples[:samples], preds, strict=False)
                ],
            )
        )
    return EvalReport(metric, results, time.perf_counter() - t0, mixed)


def _run(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    names: list[str | None],
    max_new_tokens: int,
    batch_size: int,
    with_perplexity: bool,
) -> tuple[list[str], list[tuple[float, int]]]:
    """Answers (and answer NLLs) of rows routed to `names`: for a plain model every name is None."""
    prompts = [ex.prompt for ex in examples]
    preds = generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, adapter_names=names
    )
    if not with_perplexity:
        return preds, []
    return preds, answer_nll(model, tokenizer, examples, batch_size=batch_size, adapter_names=names)


def _last_user(example: Example) -> str:
    return next((m.content for m in reversed(example.prompt) if m.role == "user"), "")


def format_table(report: EvalReport) -> str:
    """A plain aligned table: adapter | metric | perplexity | n | seconds. A score on examples the
    adapter was trained on is marked with a "*" and a line under the table that says so."""
    header = ("adapter", report.metric, "perplexity", "n", "seconds")
    rows = [
        (
            r.adapter,
            f"{r.score:.3f}{'*' if r.trained_on else ''}",
            "-" if r.perplexity is None or math.isnan(r.perplexity) else f"{r.perplexity:.3f}",
            str(r.n),
            f"{r.seconds:.1f}",
        )
        for r in report.results
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    notes = [_not_held_out(r) for r in report.results if r.trained_on]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *notes])


def _not_held_out(result: AdapterResult) -> str:
    which = "these" if result.trained_on == result.n else f"{result.trained_on} of these"
    return f"* {result.adapter!r} was trained on {which} {result.n} examples: its score is not held-out"
