"""Built-in tasks and `load_data`: deterministic, disjoint splits, answers that follow the stated
format and are really determined by the input, variety, and the spec strings. No model needed."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from peftkit.data import tasks as T
from peftkit.data.source import load_data
from peftkit.data.tasks import TASKS, get_task
from peftkit.errors import DataError
from peftkit.eval.metrics import METRICS

NAMES = list(TASKS)


@pytest.fixture(scope="module")
def train() -> dict[str, list]:
    return {name: TASKS[name].examples("train") for name in NAMES}


@pytest.fixture(scope="module")
def test() -> dict[str, list]:
    return {name: TASKS[name].examples("test") for name in NAMES}


def user_input(example) -> str:
    """The task input: the text after 'Label: ' on the prompt's second line."""
    instruction, line = example.prompt[-1].content.split("\n")
    label, _, text = line.partition(": ")
    assert instruction == TASKS[example.meta["task"]].instruction
    assert label == TASKS[example.meta["task"]].label
    return text


def test_registry_and_typos() -> None:
    assert {"dates", "extract", "sentiment"} <= set(NAMES)
    for name, task in TASKS.items():
        assert task.name == name and task.metric in METRICS and task.max_new_tokens > 0
    with pytest.raises(DataError, match=r"unknown task 'datez' \(did you mean 'dates'\?\).*dates, extract"):
        get_task("datez")


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_deterministic_and_prefixes(name: str, train: dict) -> None:
    task = TASKS[name]
    assert len(train[name]) == 2000 and len(task.examples("test")) == 200
    assert task.examples("train") == train[name]  # Example equality: messages and source
    assert task.examples("train", 50) == train[name][:50]
    assert task.examples("train", 0) == []
    first = train[name][0]
    assert first.source == f"task:{name}:train:0" and first.meta["task"] == name
    assert [m.role for m in first.messages] == ["user", "assistant"]


def test_examples_do_not_depend_on_the_process() -> None:
    """Seeds are strings hashed by `random` itself, not Python's per-process `hash()`."""
    code = (
        "from peftkit.data.tasks import TASKS;"
        "print([e.answer for t in TASKS.values() for e in t.examples('test', 5)])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    expected = str([e.answer for t in TASKS.values() for e in t.examples("test", 5)])
    assert outs == {expected + "\n"}


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint(name: str, train: dict, test: dict) -> None:
    train_prompts = {e.prompt for e in train[name]}
    test_prompts = {e.prompt for e in test[name]}
    assert len(train_prompts) == 2000 and len(test_prompts) == 200  # no repeats within a split
    assert not train_prompts & test_prompts
    if name == "dates":  # stronger: no test date appears in training in any spelling
        assert not {e.answer for e in train[name]} & {e.answer for e in test[name]}
    if name == "extract":
        assert not {e.answer for e in train[name]} & {e.answer for e in test[name]}


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_scores_1_on_its_own_metric(name: str, test: dict) -> None:
    metric = METRICS[TASKS[name].metric]
    assert all(metric(e.answer, e.answer) == 1.0 for e in test[name])
    assert all(metric(" " + e.answer + "\n", e.answer) == 1.0 for e in test[name])  # stray whitespace


def test_dates_answers_are_the_dates_written(train: dict) -> None:
    for e in train["dates"]:
        text, d = user_input(e), dt.date.fromisoformat(e.answer)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", e.answer)
        assert str(d.year) in text
        month = T.MONTHS[d.month - 1]
        assert (
            month[:3].lower() in text.lower()
            or f"{d.year}/{d.month:02d}/{d.day:02d}" in text
            or (f"{d.year}.{d.month:02d}.{d.day:02d}" in text)
        )
        day_words = {str(d.day), f"{d.day:02d}", T.ORDINAL_WORDS[d.day - 1]}
        assert set(re.findall(r"\d+|[a-z]+(?:-[a-z]+)*", text.lower())) & day_words
        weekdays = [w for w in T.WEEKDAYS if w in text]
        assert weekdays in ([], [T.WEEKDAYS[d.weekday()]])
        assert not re.search(r"\b\d{1,2}/\d{1,2}/\d{4}\b", text)  # no ambiguous D/M/Y or M/D/Y


def test_extract_answers_are_compact_ordered_json_copied_from_the_message(train: dict) -> None:
    for e in train["extract"]:
        text, value = user_input(e), json.loads(e.answer)
        assert list(value) == ["name", "city", "order_id"]
        assert e.answer == json.dumps(value) and "\n" not in e.answer
        assert all(v in text for v in value.values())
        assert re.fullmatch(r"[A-Z]{2}-\d{5}", value["order_id"])
        assert value["name"].split()[0] in T.FIRST_NAMES and value["city"] in T.CITIES


def test_sentiment_labels_follow_from_the_clauses(train: dict) -> None:
    """Re-derive every label from the review's sentences: praise only, complaints only, or neutral."""
    for e in train["sentiment"]:
        text = user_input(e)
        kinds = []
        for sentence in re.findall(r"[^.]+\.", text):
            sentence = sentence.strip()
            kinds += [kind for kind, pool in (("+", T.PRAISE), ("-", T.COMPLAINTS), ("0", T.FACTS))
                      if any(re.fullmatch(_pattern(c), sentence) for c in pool)]  # fmt: skip
        assert len(kinds) == len(re.findall(r"[^.]+\.", text))  # every sentence is of exactly one kind
        pos, neg = kinds.count("+"), kinds.count("-")
        expected = "positive" if pos and not neg else "negative" if neg and not pos else "neutral"
        assert e.answer == expected, text
        assert (pos, neg) in {(1, 0), (2, 0), (0, 1), (0, 2), (0, 0), (1, 1)}


def _pattern(clause: str) -> str:
    """A regex for a clause template: {p} any product, other fields any words."""
    escaped = re.escape(clause).replace(r"\{p\}", "(?:" + "|".join(map(re.escape, T.PRODUCTS)) + ")")
    return re.sub(r"\\\{\w+\\\}", r"[\\w ]+", escaped)


@pytest.mark.parametrize("name", NAMES)
def test_variety(name: str, train: dict) -> None:
    task, examples = TASKS[name], train[name]
    templates = Counter(e.meta["template"] for e in examples)
    assert len(templates) == task.templates  # every template is used ...
    assert max(templates.values()) < 2 * len(examples) / task.templates  # ... and none dominates
    if name != "dates":  # (a date's digits are the whole point, so masking them says nothing)
        # Near-duplicates: inputs that are equal once digits are masked stay rare.
        skeletons = Counter(re.sub(r"\d", "0", user_input(e)) for e in examples)
        assert skeletons.most_common(1)[0][1] <= 0.01 * len(examples)
    answers = Counter(e.answer for e in examples)
    if name == "sentiment":
        assert set(answers) == {"positive", "negative", "neutral"}
        assert all(0.2 < c / len(examples) < 0.5 for c in answers.values())
    else:
        assert len(answers) > 0.9 * len(examples)


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown split 'dev'"):
        TASKS["dates"].examples("dev")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="n must be >= 0"):
        TASKS["dates"].examples("train", -1)


# -- load_data -----------------------------------------------------------------------------------
def test_load_data_task_specs() -> None:
    assert load_data("task:dates") == TASKS["dates"].examples("train")
    assert load_data("task:dates", split="test", n=7) == TASKS["dates"].examples("test", 7)
    assert load_data("task:sentiment:test", split="train", n=3) == TASKS["sentiment"].examples("test", 3)
    with pytest.raises(DataError, match=r"unknown task 'sentimen' \(did you mean 'sentiment'\?\)"):
        load_data("task:sentimen")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_data("task:dates:dev")


def test_load_data_files(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_data(str(path))
    assert [(e.prompt[-1].content, e.answer) for e in examples] == [(f"q{i}", f"a{i}") for i in range(5)]
    assert load_data(str(path), split="test", n=2) == examples[:2]  # a file is one split
    with pytest.raises(DataError, match=r"no such file.*task:dates, task:extract, task:sentiment"):
        load_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="n must be >= 0"):
        load_data(str(path), n=-1)
