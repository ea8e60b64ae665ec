"""Evaluation runs: batched greedy generation, answer perplexity, and scoring several adapters at once.

`evaluate` scores the base model and any number of adapters on the same examples. By default every
(example, adapter) pair is a row of the same mixed batches, each row routed through its own
adapter in one `generate` call, so K adapters cost about one pass over K times the rows rather
than K separate passes with K times the padding and the per-call overhead.

    report = evaluate(am, tok, task.examples("test", 100), metric="exact_match",
                      adapters=[None, "dates"], max_new_tokens=16)
    print(format_table(report))
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from peftkit.data.example import Example, Message
from peftkit.errors import RequestError
from peftkit.eval.metrics import get_metric

# End-of-turn markers of common chat templates; generation stops at whichever the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
BASE_NAME = "base"  # how results call the base model (adapter None)


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


# -- generation ----------------------------------------------------------------------------------
def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: eos (tokenizer's and generation config's) and end-of-turn tokens."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        ids += value if isinstance(value, list) else [] if value is None else [value]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and t in tokenizer.all_special_tokens]
    return list(dict.fromkeys(ids))


def pad_token_id(tokenizer: Any, stop: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop[0] if stop else 0


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, T), rows aligned to the right edge for generation."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def decode_answer(tokenizer: Any, new_ids: Sequence[int], stop: Sequence[int]) -> str:
    """The text of generated ids up to (not including) the first stop token, without special tokens."""
    cut = next((i for i, t in enumerate(new_ids) if t in stop), len(new_ids))
    return tokenizer.decode(list(new_ids[:cut]), skip_special_tokens=True).strip()


def _adapter_kwargs(model: Any, names: Sequence[str | None] | None) -> dict[str, Any]:
    """`adapter_names=` for an AdaptedModel (None rows = base model); nothing for a plain model."""
    from peftkit.adapted import AdaptedModel

    if names is None:
        return {}
    if isinstance(model, AdaptedModel):
        return {"adapter_names": list(names)}
    if any(n is not None for n in names):
        raise RequestError("adapter names need a peftkit.AdaptedModel; this model has no adapters")
    return {}


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Inference without dropout, restoring the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    # disable=None: shown only when stderr is a terminal, so logs and captured output stay clean
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=None, leave=False)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (stable: ties keep input order)."""
    if batch_size < 1:
        raise RequestError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    adapter_names: Sequence[str | None] | None = None,
) -> list[str]:
    """Greedy answers to chat prompts, in input order.

    Prompts are encoded as in training (`encode_prompt`), sorted by length into left-padded batches
    (less padding), and decoded up to the end-of-turn/eos token without special tokens. With
    `adapter_names` (one per prompt; None = base model) each row uses its own adapter.
    """
    from peftkit.data.encode import encode_prompt

    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise RequestError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts")
    _adapter_kwargs(model, adapter_names)  # fail before any work
    ids = [encode_prompt(p, tokenizer) for p in prompts]
    stop = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, stop)
    device = next(model.parameters()).device
    answers = [""] * len(ids)
    with _eval_mode(model), _progress(len(ids), "generating") as bar:
        for rows in _batches([len(i) for i in ids], batch_size):
            input_ids, mask = left_pad([ids[i] for i in rows], pad, device)  # (B, T)
            names = None if adapter_names is None else [adapter_names[i] for i in rows]
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop or None,
                pad_token_id=pad,
                **_adapter_kwargs(model, names),
            )  # (B, T + new)
            for i, new in zip(rows, out[:, input_ids.shape[1] :].tolist(), strict=True):
                answers[i] = decode_answer(tokenizer, new, stop)
            bar.update(len(rows))
    return answers


# -- perplexity ----------------------------------------------------------------------------------
def answer_nll(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    adapter_names: Sequence[str | None] | None = None,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each example's reference answer (the last
    assistant turn with its end-of-turn tokens, given the prompt); (0.0, 0) for one that does not fit."""
    from peftkit.data.batching import collate
    from peftkit.data.encode import IGNORE_INDEX, encode

    if adapter_names is not None and len(adapter_names) != len(examples):
        raise RequestError(f"{len(adapter_names)} adapter names for {len(examples)} examples")
    _adapter_kwargs(model, adapter_names)
    encoded = [encode(ex, tokenizer, train_on="last") for ex in examples]
    pad = pad_token_id(tokenizer, stop_token_ids(model, tokenizer))
    device = next(model.parameters()).device
    totals = [(0.0, 0)] * len(examples)
    kept = [i for i, e in enumerate(encoded) if e is not None]
    with _eval_mode(model):
        for batch in _batches([len(encoded[i]) for i in kept], batch_size):
            rows = [kept[b] for b in batch]
            tensors = collate([encoded[i] for i in rows], pad)
            names = None if adapter_names is None else [adapter_names[i] for i in rows]
            logits = model(
                input_ids=tensors["input_ids"].to(device),
                attention_mask=tensors["attention_mask"].to(device),
                **_adapter_kwargs(model, names),
            ).logits  # (B, T, V)
            labels = tensors["labels"].to(device)[:, 1:]  # (B, T-1): token t+1 is predicted at t
            keep = labels != IGNORE_INDEX
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1][keep].float(), labels[keep], reduction="none"
            )  # (N,) over the answer tokens only: the full (B, T, V) log-softmax is never built
            row_of = keep.nonzero()[:, 0]
            sums = torch.zeros(len(rows), device=device).index_add_(0, row_of, nll)
            for b, i in enumerate(rows):
                totals[i] = (sums[b].item(), int(keep[b].sum()))
    return totals


def perplexity(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    adapter_names: Sequence[str | None] | None = None,
) -> float:
    """exp(mean NLL per token) of the reference answers given their prompts (NaN if none fits)."""
    return _ppl(answer_nll(model, tokenizer, examples, batch_size=batch_size, adapter_names=adapter_names))


def _ppl(totals: Sequence[tuple[float, int]]) -> float:
    tokens = sum(c for _, c in totals)
    return math.exp(sum(s for s, _ in totals) / tokens) if tokens else math.nan


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
    adapters = list(adapters) or [None]
    labels = [BASE_NAME if a is None else a for a in adapters]
    if len(set(labels)) != len(labels):
        raise RequestError(f"adapters must be distinct (None is {BASE_NAME!r}): {labels}")
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
                perplexity=_ppl(nll) if with_perplexity else None,
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
    """A plain aligned table: adapter | metric | perplexity | n | seconds."""
    header = ("adapter", report.metric, "perplexity", "n", "seconds")
    rows = [
        (
            r.adapter,
            f"{r.score:.3f}",
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
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
