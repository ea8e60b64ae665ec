"""`peftkit eval`, `peftkit generate`, `peftkit chat`: registered with the CLI when the parser is built.

Heavy imports (torch, transformers) happen inside the commands, so building the parser stays fast.
"""

from __future__ import annotations

import json as _json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

from peftkit.base.catalog import DEFAULT_BASE
from peftkit.command_args import AdapterRegistry, Base, Dtype, Quantize
from peftkit.errors import DataError, RequestError
from peftkit.io import unwritable_reason
from peftkit.terminal import printable

from .loading import (
    adapter_specs,
    load_model,  # noqa: F401  (callers from before eval/loading.py import it from here)
    longest_answer,
    warnings_as_notes,
)
from .loading import log as _log

MetricName = Literal["auto", "exact_match", "json_match", "accuracy", "token_f1", "rouge_l"]


def _at_least(option: str, value: int, least: int, meaning: str = "") -> None:
    """Refuse a number option below `least` before any work (a negative count would mean "all" or
    crash deep inside generate)."""
    if value < least:
        raise RequestError(f"--{option} must be at least {least}{meaning}, got {value}")


def check_output_file(path: Path, option: str, inputs: Sequence[tuple[str, Path]] = ()) -> None:
    """Fail before any work when `path` cannot or must not be written later: it is a directory, it is
    one of the `inputs` ((what, path) pairs) or lies inside one, or the nearest existing directory on
    its way is a file or not writable (missing directories are created; an existing file is replaced)."""
    from peftkit.paths import input_clash

    path = path.expanduser()
    if path.is_dir():
        raise RequestError(f"--{option} {path} is a directory; name a file, e.g. {path / 'report.json'}")
    clash = input_clash(path, list(inputs), ("is",))  # a new file beside an input destroys nothing
    if clash:
        raise RequestError(
            f"--{option} {path} {clash}; writing there could destroy an input: name a file elsewhere"
        )
    reason = unwritable_reason(path.parent)  # the file is written beside itself and renamed into place
    if reason:
        raise RequestError(f"--{option} {path} cannot be written: {reason}")
    if path.exists() and not _is_report(path):
        raise RequestError(
            f"--{option} {path} exists and is not an earlier peftkit eval report, which is all a report "
            "replaces; name a new file, or move that one away"
        )


def _is_report(path: Path) -> bool:
    """Whether `path` holds a report `eval --json` wrote (a JSON object with its "settings"); a device
    or pipe (/dev/stdout) is none, and is not read."""
    if not path.is_file():
        return False
    try:
        data = _json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8 or not JSON
        return False
    return isinstance(data, dict) and isinstance(data.get("settings"), dict)


def eval(
    data: str,
    base: Base = DEFAULT_BASE,
    adapters: list[str] | None = None,
    split: Literal["train", "test"] = "test",
    n: int = 200,
    metric: MetricName = "auto",
    max_new_tokens: int = 0,
    batch_size: int = 16,
    dtype: Dtype = "auto",
    perplexity: bool = True,
    samples: int = 0,
    json: Path | None = None,
    check_base: bool = True,
    quantize: Quantize = None,
    registry: AdapterRegistry = None,
) -> None:
    """Score the base model and each adapter on a dataset, side by side (greedy decoding).

    The adapters are evaluated in the same mixed batches: every row of a batch is routed through its
    own adapter in one generate call. Adapters that cannot share one model (two methods on the same
    modules, e.g. LoRA and IA3 with their default targets) are scored in a pass of their own on the
    same base. Prints one table: adapter | metric | perplexity | n | seconds.

    Args:
        data: a built-in task (task:dates, task:extract, task:sentiment; task:NAME:SPLIT picks the split)
            or a dataset file/directory (JSONL, JSON, CSV, HF dataset dir); the last assistant turn is
            the reference answer
        adapters: adapter directories to evaluate next to the base model, each named after its directory
            (made a valid, unique name), or NAME=DIR to name it
        split: the split of a built-in task (files are one split)
        n: how many examples (the first n); 0 = all of a file, or a task's default split size
        metric: auto = the task's own metric for a built-in task, exact_match for files
        max_new_tokens: tokens to generate per answer; 0 = auto (the task's, or the longest reference + 8)
        batch_size: rows per generate call (each example counts once per adapter)
        perplexity: also measure the perplexity of the reference answers
        samples: print this many (prompt, reference, prediction) examples per adapter
        json: also write the report (with every prediction) to this JSON file
        check_base: refuse adapters whose recorded base fingerprint differs from this base's
            (--no-check-base loads them anyway; names and shapes are still checked)
    """
    from peftkit.data.source import load_data, parse_task_spec
    from peftkit.eval.heldout import trained_on
    from peftkit.eval.metrics import check_references
    from peftkit.eval.passes import open_side_by_side
    from peftkit.eval.run import format_table

    named = adapter_specs(list(adapters or []))
    _check_eval_args(
        data,
        base,
        named,
        n=n,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        samples=samples,
        json=json,
    )
    task = parse_task_spec(data, split)
    examples = load_data(data, split=split, n=n if n > 0 else None)
    if not examples:
        raise DataError(f"data {data!r}: no examples to evaluate")
    metric = metric if metric != "auto" else task[0].metric if task else "exact_match"
    check_references(metric, [ex.answer for ex in examples])  # not after the model answered them all
    with warnings_as_notes():
        side = open_side_by_side(
            base, named, dtype, check_base=check_base, quantize=quantize, registry=registry
        )
        names = [name for name, _ in named]
        if max_new_tokens == 0:
            max_new_tokens = task[0].max_new_tokens if task else longest_answer(side.tokenizer, examples) + 8
        rows = len(examples) * (len(names) + 1)
        _log(f"evaluating {len(examples)} examples x {len(names) + 1} models ({rows} rows), {metric} ...")
        report = side.evaluate(
            examples,
            metric=metric,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            with_perplexity=perplexity,
            samples=max(samples, 3),
        )
    for name, source in side.sources.items():  # a score on its own training data is no held-out one
        report[name].trained_on = trained_on(source.directory, data, examples, source.files.metadata)
    print(format_table(report))
    for r in report.results if samples > 0 else ():
        for s in r.samples[:samples]:
            text = f"\n== {r.adapter}\nprompt:     {s.prompt}\nreference:  {s.reference}\n"
            print(printable(text + f"prediction: {s.prediction}", keep="\n\t"))
    if json is not None:
        settings = {"data": data, "base": base, "adapters": [str(a) for a in adapters or []], "split": split}
        settings |= {"adapter_names": names, "n": len(examples), "max_new_tokens": max_new_tokens}
        _write_report(json, settings | {"dtype": dtype}, report)


def _check_eval_args(
    data: str,
    base: str,
    named: list[tuple[str, Path]],
    *,
    n: int,
    max_new_tokens: int,
    batch_size: int,
    samples: int,
    json: Path | None,
) -> None:
    """Refuse eval's numbers and report file before any data or model loads: the report must be
    writable and must not land on (or among) the data, the base model or an adapter."""
    from peftkit.paths import input_paths

    _at_least("n", n, 0, " (0 = all)")
    _at_least("max-new-tokens", max_new_tokens, 0, " (0 = auto)")
    _at_least("batch-size", batch_size, 1)
    _at_least("samples", samples, 0)
    if json is not None:  # not after minutes of evaluation
        check_output_file(json, "json", input_paths(base, [d for _, d in named], data))


def _write_report(path: Path, settings: dict[str, Any], report: Any) -> None:
    """Write eval's report (the settings and every prediction) to `path` as JSON, atomically."""
    from peftkit.io import write_json_atomic

    write_json_atomic(path.expanduser(), {"settings": settings, **report.to_dict(predictions=True)})
    _log(f"wrote {path}")


def _read_text(path: Path) -> str:
    """A prompts file's text, or a DataError that says what the file is instead (a directory, a
    binary file, another encoding), so no UnicodeDecodeError traceback reaches the user."""
    if path.is_dir():
        raise DataError(f"{path} is a directory; --prompts takes a text or JSONL file")
    if not path.exists():
        raise DataError(
            f"--prompts {path}: file not found; give a text file (one prompt per line) or a JSONL file"
        )
    try:
        data = path.read_bytes()
    except OSError as err:  # unreadable (permissions, a dangling link): the option and the reason
        raise DataError(f"--prompts {path}: cannot be read: {err.strerror or err}") from None
    if b"\0" in data:
        raise DataError(f"{path} is a binary file (it has NUL bytes); --prompts takes a text or JSONL file")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, which some editors write, is dropped
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8 text; save the file as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)"
        ) from None


def read_prompts(path: Path, system: str | None = None) -> list[list[Any]]:
    """Chat prompts from a file: JSONL rows with "prompt" (text) or "messages" (chat turns), or plain
    text with one prompt per line (blank lines skipped). `system` is added where there is none."""
    from peftkit.data.example import ROLES, Message, with_system

    lines = _read_text(Path(path)).splitlines()
    is_jsonl = Path(path).suffix == ".jsonl" or next((s.lstrip()[:1] for s in lines if s.strip()), "") == "{"
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append([Message("user", line.strip())])
            continue
        try:
            row = _json.loads(line)
            if isinstance(row.get("prompt"), str):
                turns = [Message("user", row["prompt"])]
            else:
                turns = [Message(m["role"], m["content"]) for m in row["messages"]]
                if not turns or any(m.role not in ROLES or not isinstance(m.content, str) for m in turns):
                    raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(
                f'{path}: line {number}: expected a JSON object with "prompt" (a string) or "messages" '
                '(a list of {"role", "content"})'
            ) from None
        if turns[-1].role != "user":  # the model answers the last message; an answer to itself is no prompt
            raise DataError(
                f"{path}: line {number}: the last message is the {turns[-1].role}'s; end each conversation "
                "with the user message the model should answer"
            )
        prompts.append(turns)
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return [list(with_system(tuple(p), system)) for p in prompts]


def generate(
    prompt: list[str] | None = None,
    base: Base = DEFAULT_BASE,
    adapter: list[str] | None = None,
    prompts: Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    dtype: Dtype = "auto",
    check_base: bool = True,
    quantize: Quantize = None,
    registry: AdapterRegistry = None,
) -> None:
    """Answer prompts with the base model or an adapter (greedy decoding) and print each answer.

    Args:
        prompt: the prompts, each one user message
        adapter: adapter directories to answer with, each DIR or DIR=WEIGHT; several are active at once
            and their changes add up, each times its weight (default 1; weights other than 1 for LoRA
            adapters), e.g. --adapter dates=0.7 sentiment=0.5 (none: the base model alone)
        prompts: a file of prompts (UTF-8): one per line, or JSONL rows with "prompt" or "messages"
        system: a system prompt for every prompt that has none
        max_new_tokens: the most tokens to generate per answer (at least 1)
        batch_size: prompts per generate call
        check_base: refuse an adapter whose recorded base fingerprint differs from this base's
            (--no-check-base loads it anyway; names and shapes are still checked)
    """
    from peftkit.data.example import Message, with_system
    from peftkit.eval.generation import generate_answers

    _at_least("max-new-tokens", max_new_tokens, 1)
    _at_least("batch-size", batch_size, 1)
    if any(not p.strip() for p in prompt or []):
        raise DataError("a PROMPT argument is blank; give each prompt some text")
    chats = [list(with_system((Message("user", p),), system)) for p in prompt or []]
    chats += read_prompts(prompts, system) if prompts is not None else []
    if not chats:
        raise DataError("no prompts: give PROMPT arguments or --prompts FILE")
    from .weighted_specs import load_weighted

    model, tokenizer = load_weighted(
        base, adapter or [], dtype, check_base=check_base, quantize=quantize, registry=registry
    )
    answers = generate_answers(model, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for chat, answer in zip(chats, answers, strict=True):
        print(printable(f">>> {chat[-1].content}\n{answer}\n", keep="\n\t"), flush=True)


def chat(
    base: Base = DEFAULT_BASE,
    adapter: list[str] | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    dtype: Dtype = "auto",
    check_base: bool = True,
    quantize: Quantize = None,
    registry: AdapterRegistry = None,
) -> None:
    """Talk to the base model or an adapter; the conversation so far is kept as context.

    Reads one message per line from stdin (UTF-8; a line that is not is skipped with a note) and
    prints each answer (greedy). Commands: /reset starts a new conversation, /quit (or Ctrl-D) exits.

    Args:
        adapter: adapter directories to chat with, each DIR or DIR=WEIGHT; several are active at once
            and their changes add up, each times its weight (default 1; weights other than 1 for LoRA
            adapters), e.g. --adapter dates=0.7 sentiment=0.5 (none: the base model alone)
        system: a system prompt for the conversation
        max_new_tokens: the most tokens per answer (at least 1)
        check_base: refuse an adapter whose recorded base fingerprint differs from this base's
            (--no-check-base loads it anyway; names and shapes are still checked)
    """
    from peftkit.data.example import Message
    from peftkit.eval.generation import generate_answers

    _at_least("max-new-tokens", max_new_tokens, 1)
    from .weighted_specs import load_weighted

    model, tokenizer = load_weighted(
        base, adapter or [], dtype, check_base=check_base, quantize=quantize, registry=registry
    )
    interactive = sys.stdin.isatty()
    start = [Message("system", system)] if system else []
    history = list(start)
    if interactive:
        print("peftkit chat: /reset starts over, /quit or Ctrl-D exits", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        text = read_message(sys.stdin)
        if text is None or text == "/quit":  # None: end of input (Ctrl-D)
            break
        if text == "/reset":
            history = list(start)
            print("(new conversation)", file=sys.stderr, flush=True)
            continue
        if not text:
            continue
        history.append(Message("user", text))
        answer = generate_answers(model, tokenizer, [history], max_new_tokens=max_new_tokens, batch_size=1)[0]
        history.append(Message("assistant", answer))
        print(printable(answer, keep="\n\t"), flush=True)


def read_message(stream: IO[str]) -> str | None:
    """The next line of `stream`, stripped; None at the end of input. A line that is not UTF-8 is
    skipped with a note on stderr and read as "": one bad byte should not end a conversation."""
    raw = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline().encode()
    if not raw:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        print(
            f"(skipped a line that is not UTF-8 text: byte 0x{raw[err.start]:02x}; type it again)",
            file=sys.stderr,
            flush=True,
        )
        return ""
