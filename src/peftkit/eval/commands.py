"""`peftkit eval`, `peftkit generate`, `peftkit chat`: registered with the CLI when the parser is built.

Heavy imports (torch, transformers) happen inside the commands, so building the parser stays fast.
"""

from __future__ import annotations

import json as _json
import sys
from pathlib import Path
from typing import Any, Literal

from peftkit.base.catalog import DEFAULT_BASE
from peftkit.cli import command
from peftkit.errors import DataError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
MetricName = Literal["auto", "exact_match", "json_match", "accuracy", "token_f1", "rouge_l"]
FILE_MAX_NEW_TOKENS = 512  # the cap of --max-new-tokens 0 (auto) for files: longest reference + 8


def _log(message: str) -> None:
    print(f"peftkit: {message}", file=sys.stderr, flush=True)


def load_model(base: str, adapter_dirs: list[Path], dtype: str) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, adapter names): the base, wrapped in an AdaptedModel when adapters are
    given, each loaded under its directory's name (made unique; never "base")."""
    from transformers.utils import logging as hf_logging

    from peftkit.adapted import AdaptedModel
    from peftkit.base import load_base
    from peftkit.formats.peft import read_adapter

    for d in adapter_dirs:  # fail on a bad adapter before the slow base-model load
        read_adapter(d)
    hf_logging.disable_progress_bar()
    _log(f"loading base model {base} ...")
    model, tokenizer = load_base(base, dtype=dtype)
    names: list[str] = []
    for d in adapter_dirs:
        stem = Path(d).resolve().name or "adapter"
        name, k = stem, 1
        while name in names or name == "base":
            k += 1
            name = f"{stem}-{k}"
        names.append(name)
    if not adapter_dirs:
        return model, tokenizer, names
    am = AdaptedModel(model)
    for d, name in zip(adapter_dirs, names, strict=True):
        _log(f"loading adapter {d} as {name!r} ...")
        am.load_adapter(d, name)
    return am, tokenizer, names


@command
def eval(
    data: str,
    base: str = DEFAULT_BASE,
    adapters: list[Path] | None = None,
    split: Literal["train", "test"] = "test",
    n: int = 200,
    metric: MetricName = "auto",
    max_new_tokens: int = 0,
    batch_size: int = 16,
    dtype: Dtype = "auto",
    perplexity: bool = True,
    samples: int = 0,
    json: Path | None = None,
) -> None:
    """Score the base model and each adapter on a dataset, side by side (greedy decoding).

    All adapters are evaluated in the same mixed batches: every row of a batch is routed through its
    own adapter in one generate call. Prints a table: adapter | metric | perplexity | n | seconds.

    Args:
        data: a built-in task (task:dates, task:extract, task:sentiment; task:NAME:SPLIT picks the split)
            or a dataset file/directory (JSONL, JSON, CSV, HF dataset dir); the last assistant turn is
            the reference answer
        base: the base model: a built-in name, an HF model directory or a .gguf file
        adapters: adapter directories to evaluate next to the base model (named after the directory)
        split: the split of a built-in task (files are one split)
        n: how many examples (the first n); 0 = all of a file, or a task's default split size
        metric: auto = the task's own metric for a built-in task, exact_match for files
        max_new_tokens: tokens to generate per answer; 0 = auto (the task's, or the longest reference + 8)
        batch_size: rows per generate call (each example counts once per adapter)
        dtype: the dtype to load the base in (auto: the checkpoint's own)
        perplexity: also measure the perplexity of the reference answers
        samples: print this many (prompt, reference, prediction) examples per adapter
        json: also write the report (with every prediction) to this JSON file
    """
    from peftkit.data.source import load_data, parse_task_spec
    from peftkit.eval.run import evaluate, format_table

    task = parse_task_spec(data, split)
    examples = load_data(data, split=split, n=n if n > 0 else None)
    if not examples:
        raise DataError(f"data {data!r}: no examples to evaluate")
    metric = metric if metric != "auto" else task[0].metric if task else "exact_match"
    model, tokenizer, names = load_model(base, list(adapters or []), dtype)
    if max_new_tokens <= 0:
        max_new_tokens = task[0].max_new_tokens if task else _longest_answer(tokenizer, examples) + 8
    rows = len(examples) * (len(names) + 1)
    _log(f"evaluating {len(examples)} examples x {len(names) + 1} models ({rows} rows), {metric} ...")
    report = evaluate(
        model,
        tokenizer,
        examples,
        metric=metric,
        adapters=[None, *names],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        with_perplexity=perplexity,
        samples=max(samples, 3),
    )
    print(format_table(report))
    for r in report.results if samples > 0 else ():
        for s in r.samples[:samples]:
            print(
                f"\n== {r.adapter}\nprompt:     {s.prompt}\nreference:  {s.reference}\nprediction: {s.prediction}"
            )
    if json is not None:
        from peftkit.io import write_json_atomic

        settings = {"data": data, "base": base, "adapters": [str(a) for a in adapters or []], "split": split}
        settings |= {"n": len(examples), "max_new_tokens": max_new_tokens, "dtype": dtype}
        write_json_atomic(Path(json), {"settings": settings, **report.to_dict(predictions=True)})
        _log(f"wrote {json}")


def _longest_answer(tokenizer: Any, examples: list) -> int:
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    return min(longest, FILE_MAX_NEW_TOKENS - 8)


def read_prompts(path: Path, system: str | None = None) -> list[list[Any]]:
    """Chat prompts from a file: JSONL rows with "prompt" (text) or "messages" (chat turns), or plain
    text with one prompt per line (blank lines skipped). `system` is added where there is none."""
    from peftkit.data.example import ROLES, Message, with_system

    lines = Path(path).read_text(encoding="utf-8").splitlines()
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
        prompts.append(turns)
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return [list(with_system(tuple(p), system)) for p in prompts]


@command
def generate(
    prompt: list[str] | None = None,
    base: str = DEFAULT_BASE,
    adapter: Path | None = None,
    prompts: Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    dtype: Dtype = "auto",
) -> None:
    """Answer prompts with the base model or an adapter (greedy decoding) and print each answer.

    Args:
        prompt: the prompts, each one user message
        base: the base model: a built-in name, an HF model directory or a .gguf file
        adapter: an adapter directory to answer with (none: the base model alone)
        prompts: a file of prompts: one per line, or JSONL rows with "prompt" or "messages"
        system: a system prompt for every prompt that has none
        max_new_tokens: the most tokens to generate per answer
        batch_size: prompts per generate call
        dtype: the dtype to load the base in (auto: the checkpoint's own)
    """
    from peftkit.data.example import Message, with_system
    from peftkit.eval.generation import generate_answers

    chats = [list(with_system((Message("user", p),), system)) for p in prompt or []]
    chats += read_prompts(prompts, system) if prompts is not None else []
    if not chats:
        raise DataError("no prompts: give PROMPT arguments or --prompts FILE")
    model, tokenizer, _ = load_model(base, [adapter] if adapter else [], dtype)
    answers = generate_answers(model, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for chat, answer in zip(chats, answers, strict=True):
        print(f">>> {chat[-1].content}\n{answer}\n", flush=True)


@command
def chat(
    base: str = DEFAULT_BASE,
    adapter: Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    dtype: Dtype = "auto",
) -> None:
    """Talk to the base model or an adapter; the conversation so far is kept as context.

    Reads one message per line from stdin and prints each answer (greedy). Commands: /reset starts
    a new conversation, /quit (or Ctrl-D) exits.

    Args:
        base: the base model: a built-in name, an HF model directory or a .gguf file
        adapter: an adapter directory to chat with (none: the base model alone)
        system: a system prompt for the conversation
        max_new_tokens: the most tokens per answer
        dtype: the dtype to load the base in (auto: the checkpoint's own)
    """
    from peftkit.data.example import Message
    from peftkit.eval.generation import generate_answers

    model, tokenizer, _ = load_model(base, [adapter] if adapter else [], dtype)
    interactive = sys.stdin.isatty()
    start = [Message("system", system)] if system else []
    history = list(start)
    if interactive:
        print("peftkit chat: /reset starts over, /quit or Ctrl-D exits", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            break
        text = line.strip()
        if text == "/quit":
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
        print(answer, flush=True)
