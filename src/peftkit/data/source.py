"""`load_data`: one string names any dataset, a built-in task or a file, for the CLI and configs.

load_data("task:dates")               # the built-in task's train split (2000 examples)
load_data("task:dates:test", n=100)   # its first 100 test examples
load_data("data/support.jsonl")       # a file or HF dataset directory, via load_examples
"""

from __future__ import annotations

from pathlib import Path

from peftkit.data.example import Example
from peftkit.data.tasks import TASKS, Task, get_task
from peftkit.errors import DataError

TASK_PREFIX = "task:"


def parse_task_spec(spec: str, split: str = "train") -> tuple[Task, str] | None:
    """(task, split) for "task:NAME" or "task:NAME:SPLIT" (the spec's split wins over `split`);
    None when `spec` does not name a task."""
    if not spec.startswith(TASK_PREFIX):
        return None
    name, _, spec_split = spec[len(TASK_PREFIX) :].partition(":")
    split = spec_split or split
    if split not in ("train", "test"):
        raise DataError(f"data {spec!r}: unknown split {split!r}; valid: train, test")
    return get_task(name), split


def load_data(spec: str, *, split: str = "train", n: int | None = None) -> list[Example]:
    """The examples `spec` names: "task:NAME[:SPLIT]" for a built-in task (default split `split`), else a
    file or directory read by `peftkit.data.files.load_examples` (whose rows are one split, so
    `split` does not apply). `n` keeps the first n examples (a task generates exactly n)."""
    if n is not None and n < 0:
        raise DataError(f"data {spec!r}: n must be >= 0, got {n}")
    task = parse_task_spec(spec, split)
    if task is not None:
        return task[0].examples(task[1], n)  # type: ignore[arg-type]
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data {spec!r}: no such file or directory; give a JSONL/JSON/CSV file, an HF dataset "
            f"directory, or a built-in task: {', '.join(TASK_PREFIX + t for t in TASKS)}"
        )
    from peftkit.data.files import load_examples

    examples = load_examples(path)
    return examples if n is None else examples[:n]
