"""Dataset files -> `Example`s: JSONL, JSON, CSV or a `datasets` directory; three row formats.

Row formats, detected per file from the keys of its rows (every row must use the same one):
- chat: `messages`, a list of {"role", "content"}; roles system/user/assistant, a system turn
  only first, content a non-blank string, the first turn not the assistant's (an answer needs a
  prompt), and the last turn the assistant's (the answer the model learns; turns after it would
  carry no loss, so they are an error rather than silently dropped);
- `prompt` / `completion`: one user turn and one assistant turn;
- alpaca: `instruction`, optional `input` (joined to the instruction with a blank line), `output`.
Other keys are kept as strings in `Example.meta`. Text must be valid Unicode (no lone surrogates
from a JSON "\\ud800" escape). Blank lines in a JSONL or CSV file are not rows;
every other malformed row raises DataError naming the file, the row, the problem and the fix.
Rows are located as an editor shows them: "line 7" (1-based) for JSONL and CSV (the line a CSV
record starts on), "[2]" / "train[2]" (0-based element index) for JSON and `datasets` rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError, did_you_mean
from ..values import int_limit_problem, surrogate_problem
from .example import ROLES, Example, Message, with_system

Format = Literal["auto", "messages", "prompt_completion", "alpaca"]
FORMATS = ("messages", "prompt_completion", "alpaca")
_REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_OWN_KEYS = {
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "input", "output"},
}
_LABELS = {"messages": "a chat", "prompt_completion": "a prompt/completion", "alpaca": "an alpaca"}
_FORMAT_HINT = "use 'messages' (chat), 'prompt' + 'completion', or 'instruction' + 'output' (alpaca)"
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

Row = tuple[str, str, Any]  # (where, for errors: "line 7"; Example.source: "file.jsonl:7"; the parsed row)


def load_examples(path: str | Path, *, format: Format = "auto", system: str | None = None) -> list[Example]:
    """Read every row of a dataset file as an `Example` (see the module docstring for formats).

    `format` "auto" detects the row format from the keys; `system` adds a system turn to every
    row that has none. Raises DataError on the first malformed row, an empty file or an unknown
    file type; never skips a row.
    """
    if format not in ("auto", *FORMATS):
        raise ConfigError(f"unknown dataset format {format!r}; use one of auto, {', '.join(FORMATS)}")
    path = Path(path)
    rows = list(_read_rows(path))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty); add at least one example")
    file_format = format if format != "auto" else _detect(path, rows[0])
    return [_to_example(path, row, file_format, format == "auto", rows[0][0], system) for row in rows]


def dataset_hash(examples: Sequence[Example]) -> str:
    """ "sha256:<hex>" over the canonical JSON lines of the examples' messages, in order (lineage)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()}"


def split_examples(
    examples: Sequence[Example], val_fraction: float, *, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded shuffle picks round(n * val_fraction) examples for validation, at
    least 1 when val_fraction > 0 and n >= 2, and never all of them. Both keep the input order."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [
        e for i, e in enumerate(examples) if i in val
    ]


# ---------------------------------------------------------------- reading files into rows


def _read_rows(path: Path) -> Iterator[Row]:
    if path.is_dir():
        return _read_datasets_dir(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    if suffix not in readers:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            "use .jsonl, .json, .csv or a directory saved with datasets' save_to_disk"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); re-save the file as UTF-8") from err
    return readers[suffix](path, text)


def _read_jsonl(path: Path, text: str) -> Iterator[Row]:
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        row = _json(line, f"{path}: line {number}", "each line must hold one JSON object")
        yield f"line {number}", f"{path.name}:{number}", row


def _read_json(path: Path, text: str) -> Iterator[Row]:
    data = _json(text, str(path), "fix the syntax")
    prefix = ""
    if isinstance(data, dict):
        prefix = next((key for key in ("data", "train") if isinstance(data.get(key), list)), "")
        if not prefix:
            raise DataError(
                f"{path}: a JSON object without a 'data' or 'train' list (keys: {', '.join(data) or 'none'}); "
                "make the file a list of rows, or put them under 'data'"
            )
        data = data[prefix]
    if not isinstance(data, list):
        raise DataError(f"{path}: the JSON is of type {type(data).__name__}; make it a list of row objects")
    for index, row in enumerate(data):
        where = f"{prefix}[{index}]"
        yield where, f"{path.name}:{where}" if prefix else f"{path.name}{where}", row


def _read_csv(path: Path, text: str) -> Iterator[Row]:
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB cuts long conversations
    reader = csv.reader(io.StringIO(text, newline=""))  # not splitlines: fields may hold U+2028
    try:
        header = [name.strip() for name in next(reader, [])]
        if len(set(header)) != len(header):
            raise DataError(f"{path}: line 1: the header repeats a column name ({header}); rename it")
        while True:
            start = reader.line_num + 1
            fields = next(reader, None)
            if fields is None:
                return
            if not fields:  # an empty line; a line of empty fields is a row (and an error)
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}: line {start}: {len(fields)} fields but the header has {len(header)}; "
                    'quote fields that contain commas, e.g. "a, b"'
                )
            row: dict[str, Any] = dict(zip(header, fields))
            if "messages" in row:
                row["messages"] = _parse_json_cell(path, start, row["messages"])
            yield f"line {start}", f"{path.name}:{start}", row
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({err}); check the quoting") from err


def _parse_json_cell(path: Path, line: int, cell: str) -> Any:
    fix = 'write it as a JSON list, e.g. [{"role": "user", "content": "..."}, ...]'
    return _json(cell, f"{path}: line {line}: the 'messages' column", fix)


def _json(text: str, where: str, fix: str) -> Any:
    """json.loads, with every failure a DataError naming `where` (the file, and the line if known)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"line {err.lineno}, column {err.colno}" if "\n" in text else f"column {err.colno}"
        raise DataError(f"{where} is not valid JSON ({err.msg} at {at}); {fix}") from None
    except RecursionError:
        raise DataError(f"{where} nests JSON lists or objects too deeply; flatten the data") from None
    except ValueError as err:  # an integer of more than 4300 digits (Python's int-from-text limit)
        problem = int_limit_problem(err)
        raise DataError(
            f"{where} holds a number Python cannot read ({problem}); write it as a string"
        ) from None


def _read_datasets_dir(path: Path) -> Iterator[Row]:
    if not any((path / marker).is_file() for marker in _DATASETS_MARKERS):
        raise DataError(f"{path}: a directory but not one saved with datasets' save_to_disk; pass a file")
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{path}: reading a datasets directory needs the datasets package: pip install datasets"
        ) from err
    loaded, split = datasets.load_from_disk(str(path)), ""
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise DataError(f"{path}: splits {splits} and none is 'train'; save the split to train on alone")
        split = "train" if "train" in loaded else splits[0]
        loaded = loaded[split]
    for index, row in enumerate(loaded):
        where = f"{split}[{index}]"
        yield where, f"{path.name}:{where}" if split else f"{path.name}{where}", row


# ---------------------------------------------------------------- rows into Examples


def _row_format(path: Path, where: str, row: Any) -> str | None:
    """The format this row's keys say, or None when no format's required keys are all present."""
    if not isinstance(row, dict):
        raise DataError(
            f"{path}: {where}: the row is of type {type(row).__name__}; each row must be an object, {_FORMAT_HINT}"
        )
    found = [fmt for fmt, keys in _REQUIRED.items() if all(row.get(key) is not None for key in keys)]
    if len(found) > 1:
        raise DataError(
            f"{path}: {where}: the row has the keys of several formats ({', '.join(found)}); keep one"
        )
    return found[0] if found else None


def _detect(path: Path, first: Row) -> str:
    where, _, row = first
    fmt = _row_format(path, where, row)
    if fmt is None:
        raise DataError(f"{path}: {where}: {_undetected(row)}")
    return fmt


def _undetected(row: dict[str, Any]) -> str:
    """Why no format fits a row, in the row's own terms: the field a format's keys lack ('has
    'prompt' but no 'completion''), the misspelt keys, or else the formats there are."""
    known = [k for keys in _OWN_KEYS.values() for k in keys]
    hints = [f"{key!r}{hint}" for key in row if key not in known and (hint := did_you_mean(str(key), known))]
    typos = "".join(f"; {hint}" for hint in hints)
    partial = []
    for fmt, own in _OWN_KEYS.items():
        present = [key for key in _REQUIRED[fmt] if row.get(key) is not None] + sorted(own & set(row))
        if present:
            absent = next(key for key in _REQUIRED[fmt] if row.get(key) is None)
            needs = " and ".join(repr(k) for k in _REQUIRED[fmt])
            partial.append(f"has {present[0]!r} but {_no(row, absent)} ({_LABELS[fmt]} row needs {needs})")
    if len(partial) == 1:
        return f"the row {partial[0]}; add it{typos}"
    if partial:
        return f"the row {' and '.join(partial)}: no format is complete; keep one{typos}"
    return f"cannot tell the row format from the keys {sorted(map(str, row))}; {_FORMAT_HINT}{typos}"


def _no(row: dict[str, Any], key: str) -> str:
    return f"its {key!r} is null" if key in row else f"no {key!r}"


def _to_example(path: Path, row: Row, fmt: str, auto: bool, first_where: str, system: str | None) -> Example:
    where, source, data = row
    found = _row_format(path, where, data)
    if auto and found not in (fmt, None):
        raise DataError(
            f"{path}: {where}: the row is {found} but {first_where} is {fmt}; every row of a file must use one format"
        )
    missing = [key for key in _REQUIRED[fmt] if data.get(key) is None]
    if missing:
        raise DataError(f"{path}: {where}: missing {missing[0]!r} (the file's rows are {fmt}); add it")

    def fail(problem: str) -> DataError:
        return DataError(f"{path}: {where}: {problem}")

    if fmt == "messages":
        messages = _messages(data["messages"], fail)
    else:
        if fmt == "prompt_completion":
            user, answer = _text(data, "prompt", fail), _text(data, "completion", fail)
        else:
            user, answer = _text(data, "instruction", fail), _text(data, "output", fail)
            extra = data.get("input")
            if extra is not None and not isinstance(extra, str):
                raise fail(f"'input' is of type {type(extra).__name__}; it must be a string (or left out)")
            _check_text(extra or "", "'input'", fail)
            if extra and extra.strip():
                user = f"{user}\n\n{extra}"
        messages = [Message("user", user), Message("assistant", answer)]
    return Example(with_system(tuple(messages), system), source, _meta(data, fmt, fail))


def _meta(data: dict, fmt: str, fail: Any) -> dict[str, str]:
    """The row's other keys, as strings (JSON for non-strings)."""
    meta = {}
    for key, value in data.items():
        if key in _OWN_KEYS[fmt] or value is None:
            continue
        try:
            text = value if isinstance(value, str) else json.dumps(value)
        except RecursionError:  # nested just below what json.loads allowed, one call deeper
            raise fail(f"{key!r} nests JSON lists or objects too deeply; flatten it") from None
        meta[_check_text(key, f"the key {key!r}", fail)] = _check_text(text, repr(key), fail)
    return meta


def _text(data: dict, key: str, fail: Any) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise fail(f"{key!r} is of type {type(value).__name__}; it must be a string")
    if not value.strip():
        raise fail(f"{key!r} is empty; give it text or remove the row")
    return _check_text(value, repr(key), fail)


def _check_text(value: str, what: str, fail: Any) -> str:
    """`value`, if it is valid text. A JSON escape like "\\ud800" without its pair gives a lone
    surrogate, which no tokenizer takes; it would fail far from the file, so refuse it here."""
    problem = surrogate_problem(value)
    if problem:
        raise fail(
            f"{what} {problem}; JSON escapes \\ud800-\\udfff must come in high-low pairs, fix the text"
        )
    return value


def _messages(value: Any, fail: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        what = "empty" if value == [] else f"of type {type(value).__name__}"
        raise fail(f"'messages' is {what}; it must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for number, item in enumerate(value, 1):
        at = f"'messages' item {number}"
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise fail(f"{at} is not an object with 'role' and 'content' ({str(item)[:60]}); add them")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise fail(
                f"{at} has role {role!r}{did_you_mean(str(role), ROLES)}; roles are {', '.join(ROLES)}"
            )
        if role == "system" and number > 1:
            raise fail(f"{at} is a system turn; a system turn may only come first, move it there")
        if not isinstance(content, str):
            raise fail(f"{at} has content of type {type(content).__name__}; content must be a string")
        if not content.strip():
            raise fail(f"{at} has empty content; give it text or remove the turn")
        messages.append(Message(role, _check_text(content, f"{at} content", fail)))
    if not any(m.role == "assistant" for m in messages):
        raise fail("'messages' has no assistant turn; end the conversation with the answer to learn")
    if messages[0].role == "assistant":
        # The prompt is everything before the answer; with nothing before it there is no prompt to
        # render, train on or evaluate with.
        raise fail(
            "'messages' starts with an assistant turn; put the user turn it answers (the prompt) before it"
        )
    if messages[-1].role != "assistant":
        raise fail(
            f"'messages' ends with a {messages[-1].role} turn (item {len(messages)}); the last turn must be "
            "the assistant's answer, remove the turns after it"
        )
    return messages
