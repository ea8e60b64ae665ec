"""Inference for evaluation: batched greedy generation and the perplexity of reference answers.

Both take a plain causal LM or a `peftkit.AdaptedModel`; with `adapter_names` (one per row: an adapter's
name, a {name: weight} mapping, or None = the base model) every row of a batch runs through its own
adapter or weighted set. Rows are sorted by length into
batches (less padding) and results come back in input order. The model's train/eval mode is restored.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from peftkit.data.example import Example, Message
from peftkit.errors import RequestError

AdapterChoice = str | Mapping[str, float] | None  # one row's adapter, weighted set, or base model

# End-of-turn markers of common chat templates; generation stops at whichever the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


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


def _adapter_kwargs(model: Any, names: Sequence[AdapterChoice] | None) -> dict[str, Any]:
    """`adapter_names=` for an AdaptedModel (None rows = base model); nothing for a plain model."""
    from peftkit.core.adapted import AdaptedModel
    from peftkit.core.weights import row_choices

    if names is None:
        return {}
    if isinstance(model, AdaptedModel):
        row_choices(model, names)  # unknown names, bad weights: refused before any work
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
    adapter_names: Sequence[AdapterChoice] | None = None,
) -> list[str]:
    """Greedy answers to chat prompts, in input order.

    Prompts are encoded as in training (`encode_prompt`), sorted by length into left-padded batches
    (less padding), and decoded up to the end-of-turn/eos token without special tokens. With
    `adapter_names` (one per prompt: a name, a {name: weight} mapping, None = base model) each row
    uses its own adapter or weighted set.
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
    adapter_names: Sequence[AdapterChoice] | None = None,
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
            labels = tensors["labels"].to(device)[:, 1:]  # (B, T-1): token t+1 is predicted at t
            keep = labels != IGNORE_INDEX
            # Logits only from the first answer position on (answers end the rows): the head over
            # the whole prompt would cost (B, T, V) memory, gigabytes for a 128k vocabulary.
            width = labels.shape[1] - int(keep.any(0).nonzero()[0]) if keep.any() else 1
            kw = {"logits_to_keep": width + 1} if _accepts(model, "logits_to_keep") else {}
            logits = model(
                input_ids=tensors["input_ids"].to(device),
                attention_mask=tensors["attention_mask"].to(device),
                **kw,
                **_adapter_kwargs(model, names),
            ).logits  # (B, width + 1, V), or (B, T, V)
            labels, keep = labels[:, -width:], keep[:, -width:]  # (B, width)
            nll = torch.nn.functional.cross_entropy(
                logits[:, -width - 1 : -1][keep].float(), labels[keep], reduction="none"
            )  # (N,) over the answer tokens only
            row_of = keep.nonzero()[:, 0]
            sums = torch.zeros(len(rows), device=device).index_add_(0, row_of, nll)
            for b, i in enumerate(rows):
                totals[i] = (sums[b].item(), int(keep[b].sum()))
    return totals


def _accepts(model: Any, name: str) -> bool:
    """Whether the (base) model's forward takes keyword `name`."""
    import inspect

    from peftkit.core.adapted import AdaptedModel

    base = model.model if isinstance(model, AdaptedModel) else model
    return name in inspect.signature(base.forward).parameters


def perplexity(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    adapter_names: Sequence[AdapterChoice] | None = None,
) -> float:
    """exp(mean NLL per token) of the reference answers given their prompts (NaN if none fits)."""
    return ppl_of(answer_nll(model, tokenizer, examples, batch_size=batch_size, adapter_names=adapter_names))


def ppl_of(totals: Sequence[tuple[float, int]]) -> float:
    """exp(total NLL / total tokens) of `answer_nll` rows; NaN when there are no tokens."""
    tokens = sum(c for _, c in totals)
    return math.exp(sum(s for s, _ in totals) / tokens) if tokens else math.nan
