"""Metrics: each `(prediction, reference) -> float` in [0, 1], averaged over examples by the caller.

Each metric says how it normalises text. The strict ones (`exact_match`, `json_match`) check that the
model produced the requested format, which is what a fine-tuned adapter is for; the forgiving ones
(`token_f1`, `rouge_l`) give partial credit for free-form answers.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from peftkit.errors import ConfigError, DataError, did_you_mean

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
TRAILING = ".!?,;:"


def _squash(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two are the same text after stripping the ends and collapsing runs of whitespace
    into one space; case and punctuation count ("2021-03-05" is not "2021-03-05.")."""
    return float(_squash(prediction) == _squash(reference))


def json_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction parses as JSON (after stripping whitespace) into a value equal to the
    reference's: key order and spacing do not matter, types do (`1` is not `"1"`, `true` is not `1`,
    `1` equals `1.0`). An unparseable prediction scores 0; an unparseable reference is a DataError."""
    try:
        expected = json.loads(reference)
    except json.JSONDecodeError as e:
        raise DataError(f"json_match: the reference is not valid JSON ({e}): {reference[:80]!r}") from None
    try:
        got = json.loads(prediction.strip())
    except json.JSONDecodeError:
        return 0.0
    return float(_json_equal(got, expected))


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON that, unlike Python's `==`, keeps booleans apart from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def normalize_label(text: str) -> str:
    """A label as `accuracy` compares it: whitespace collapsed, lowercased, trailing punctuation and
    surrounding quotes removed ("  Positive." -> "positive")."""
    return _squash(text).lower().rstrip(TRAILING).strip().strip("\"'`").strip()


def accuracy(prediction: str, reference: str) -> float:
    """1.0 when the prediction is the reference label, compared after `normalize_label` (so
    "Positive." counts, "The review is positive" does not: the label must be the whole answer)."""
    return float(normalize_label(prediction) == normalize_label(reference))


def _squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lowercase, drop punctuation and articles, split on whitespace."""
    return _ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split()


def token_f1(prediction: str, reference: str) -> float:
    """The F1 of the two bags of words (SQuAD's metric): tokens after lowercasing and removing
    punctuation and the articles a/an/the. Two empty answers score 1.0, one empty answer 0.0."""
    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the longest common subsequence of whitespace tokens,
    lowercased (punctuation stays part of its token, as written). Two empty texts score 1.0."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_match": json_match,
    "accuracy": accuracy,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}
"""Metric name -> function; `peftkit eval --metric` and `Task.metric` name one of these."""


def get_metric(name: str) -> Callable[[str, str], float]:
    """The metric called `name`; a ConfigError listing the metrics when there is none."""
    if name not in METRICS:
        raise ConfigError(
            f"unknown metric {name!r}{did_you_mean(name, list(METRICS))}; valid: {', '.join(METRICS)}"
        )
    return METRICS[name]


def check_references(metric: str, references: Sequence[str]) -> None:
    """Fail before any generation on references `metric` cannot score (json_match needs each to
    be JSON), rather than after the model has answered every example."""
    get_metric(metric)
    if metric != "json_match":
        return
    for number, reference in enumerate(references, start=1):
        try:
            json.loads(reference)
        except json.JSONDecodeError as e:
            raise DataError(
                f"json_match: the reference answer of example {number} is not valid JSON ({e}): "
                f"{reference[:80]!r}; choose a text metric (exact_match, token_f1, ...)"
            ) from None
