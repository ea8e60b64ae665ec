"""Examples -> token ids and labels, rendered with the tokenizer's chat template.

How the loss spans are found (no `{% generation %}` tags needed): the conversation is rendered
in prefixes. The text of assistant turn i is `render(messages[:i + 1])` minus
`render(messages[:i], add_generation_prompt=True)`: its content plus whatever the template puts
after it (e.g. `<|im_end|>`, so the model learns to stop), less trailing whitespace (the newline
after `<|im_end|>` is never generated, so it carries no loss). If a template breaks the prefix
property, the turn falls back to its content (+ eos for the last turn).

The prompt (everything before the last assistant turn, ending with the generation prompt) is
tokenized as one string, so its ids equal `encode_prompt(example.prompt)`, exactly what the
model is given at inference; earlier assistant turns inside it are marked from character
offsets. The last answer is tokenized on its own and appended, as generation would produce it.
Turns after the last assistant turn carry no loss and are left out (`load_examples` rejects them).

Tokenizers without a chat template get a plain format: each turn's content on its own line,
roles dropped, eos after assistant turns ("prompt\\n" + answer + eos for a single turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError, DataError
from .example import Example, Message

IGNORE_INDEX = -100
TrainOn = Literal["completion", "last", "all"]
Truncation = Literal["left", "right", "drop", "error"]
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}{% endfor %}"
)


@dataclass(frozen=True)
class Encoded:
    """One tokenized example; `labels` align with `input_ids` (the model shifts them)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where there is no loss
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EncodeStats:
    count: int  # examples kept (truncated ones included)
    truncated: int  # kept, but cut to max_length
    dropped: int  # too long to keep (truncation "drop", or nothing to learn left after cutting)
    total_tokens: int
    loss_tokens: int  # labels that are not IGNORE_INDEX
    max_length: int  # the longest kept example, in tokens


@dataclass(frozen=True)
class _Rendered:
    prompt: str  # everything before the last assistant turn, ending with the generation prompt
    spans: tuple[tuple[int, int], ...]  # character spans of earlier assistant turns in `prompt`
    answer: str  # the last assistant turn: content + end-of-turn markers


def encode_prompt(messages: Sequence[Message], tokenizer: Any) -> list[int]:
    """The token ids a model is given to generate the next assistant turn."""
    return tokenizer(_render(messages, tokenizer, True), add_special_tokens=False)["input_ids"]


def encode(
    example: Example,
    tokenizer: Any,
    *,
    max_length: int = 1024,
    train_on: TrainOn = "completion",
    truncation: Truncation = "left",
) -> Encoded | None:
    """Tokenize one example with loss labels; None when truncation drops it.

    `train_on`: "completion" puts the loss on every assistant turn (content + end-of-turn
    tokens), "last" on the last one only, "all" on every token. `truncation` of an example
    longer than `max_length`: "left" cuts the start of the prompt (None if the answer alone does
    not fit), "right" cuts the end (None if no loss token is left), "drop" gives None, "error"
    raises DataError.
    """
    return _encode_many([example], tokenizer, max_length, train_on, truncation)[0][0]


def encode_all(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int = 1024,
    train_on: TrainOn = "completion",
    truncation: Truncation = "left",
) -> tuple[list[Encoded], EncodeStats]:
    """`encode` every example (batch-tokenized); the dropped ones are left out and counted."""
    results = _encode_many(examples, tokenizer, max_length, train_on, truncation)
    kept = [encoded for encoded, _ in results if encoded is not None]
    stats = EncodeStats(
        count=len(kept),
        truncated=sum(1 for encoded, cut in results if encoded is not None and cut),
        dropped=len(results) - len(kept),
        total_tokens=sum(len(e) for e in kept),
        loss_tokens=sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in kept),
        max_length=max((len(e) for e in kept), default=0),
    )
    return kept, stats


def _encode_many(
    examples: Sequence[Example], tokenizer: Any, max_length: int, train_on: str, truncation: str
) -> list[tuple[Encoded | None, bool]]:
    """(encoded or None, whether it was truncated) per example, tokenizing in two batch calls."""
    _check_options(max_length, train_on, truncation)
    if not examples:  # tokenizers refuse an empty batch
        return []
    rendered = [_render_example(example, tokenizer) for example in examples]
    prompts = [r.prompt for r in rendered]
    with_offsets = getattr(tokenizer, "is_fast", False) and train_on == "completion"
    prompt_enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=with_offsets)
    answer_ids = tokenizer([r.answer for r in rendered], add_special_tokens=False)["input_ids"]
    results = []
    for i, (example, r) in enumerate(zip(examples, rendered)):
        ids = prompt_enc["input_ids"][i]
        if train_on == "all":
            prompt_labels = list(ids)
        elif train_on == "last" or not r.spans:
            prompt_labels = [IGNORE_INDEX] * len(ids)
        else:
            if with_offsets:  # a token is trained on when it starts inside an assistant span
                starts = [s for s, _ in prompt_enc["offset_mapping"][i]]
                mask = [any(a <= s < b for a, b in r.spans) for s in starts]
            else:
                mask = _in_spans_slow(r.prompt, r.spans, len(ids), tokenizer)
            prompt_labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        results.append(_fit(ids, prompt_labels, answer_ids[i], example.source, max_length, truncation))
    return results


def _fit(
    prompt_ids: list[int],
    prompt_labels: list[int],
    answer_ids: list[int],
    source: str,
    max_length: int,
    truncation: str,
) -> tuple[Encoded | None, bool]:
    ids, labels = list(prompt_ids) + list(answer_ids), prompt_labels + list(answer_ids)
    excess = len(ids) - max_length
    if excess <= 0:
        return Encoded(tuple(ids), tuple(labels), source), False
    if truncation == "error":
        raise DataError(
            f"{source or 'an example'}: {len(ids)} tokens, more than max_length={max_length}; "
            "raise max_length, shorten the example, or use truncation='left'"
        )
    if truncation == "drop" or (truncation == "left" and excess >= len(prompt_ids)):
        return None, False  # "left" keeps the whole answer plus at least one prompt token, or nothing
    if truncation == "left":
        ids, labels = ids[excess:], labels[excess:]
    else:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None, False
    return Encoded(tuple(ids), tuple(labels), source), True


def _check_options(max_length: int, train_on: str, truncation: str) -> None:
    if train_on not in ("completion", "last", "all"):
        raise ConfigError(f"train_on={train_on!r} is unknown; use 'completion', 'last' or 'all'")
    if truncation not in ("left", "right", "drop", "error"):
        raise ConfigError(f"truncation={truncation!r} is unknown; use 'left', 'right', 'drop' or 'error'")
    if max_length < 2:
        raise ConfigError(
            f"max_length={max_length} is too small; use at least 2 (a prompt and an answer token)"
        )


def _render(messages: Sequence[Message], tokenizer: Any, generation_prompt: bool) -> str:
    from jinja2 import TemplateError, TemplateSyntaxError

    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            chat_template=template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
    except TemplateSyntaxError as e:
        raise DataError(
            f"the tokenizer's chat template is not valid Jinja ({e}); fix chat_template in its "
            "tokenizer_config.json (or chat_template.jinja)"
        ) from None
    except TemplateError as e:  # templates refuse what they cannot render with raise_exception()
        roles = ", ".join(m.role for m in messages)
        raise DataError(
            f"the tokenizer's chat template cannot render a conversation with turns ({roles}): {e}. Some "
            "templates take no system turn or need user and assistant turns to alternate: drop the system "
            "prompt (from the rows, or the one the command or config adds) or reshape those rows"
        ) from None


def _turn_text(before: str, after: str, content: str, eos: str) -> str:
    """An assistant turn's text: `after` less its prefix `before`, trailing whitespace cut."""
    if after.startswith(before):
        return after[len(before) :].rstrip()
    return content + eos


def _render_example(example: Example, tokenizer: Any) -> _Rendered:
    messages = example.messages
    assistant = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not assistant:
        raise DataError(f"{example.source or 'an example'}: no assistant turn; add the answer to learn")
    if assistant[0] == 0:  # chat templates cannot render the empty prompt before it
        raise DataError(
            f"{example.source or 'an example'}: the conversation starts with an assistant turn; "
            "put the user turn it answers before it"
        )
    last = assistant[-1]
    prompt = _render(messages[:last], tokenizer, True)
    eos = getattr(tokenizer, "eos_token", None) or ""
    answer = _turn_text(prompt, _render(messages[: last + 1], tokenizer, False), messages[last].content, eos)
    spans, cursor = [], 0
    for i in assistant[:-1]:
        before, after = _render(messages[:i], tokenizer, True), _render(messages[: i + 1], tokenizer, False)
        text = _turn_text(before, after, messages[i].content, "")
        if after.startswith(before) and prompt.startswith(after):
            start = len(before)
        else:  # the template renders history differently from the end: look for the content
            text, start = messages[i].content, prompt.find(messages[i].content, cursor)
            if start < 0:
                raise DataError(
                    f"{example.source or 'an example'}: assistant turn {i + 1} is not in the rendered chat "
                    "template; use train_on='last'"
                )
        spans.append((start, start + len(text)))
        cursor = start + len(text)
    return _Rendered(prompt, tuple(spans), answer)


def _in_spans_slow(text: str, spans: Sequence[tuple[int, int]], n: int, tokenizer: Any) -> list[bool]:
    """For tokenizers without offsets: a span covers the tokens between the token counts of the
    text up to its start and up to its end (exact unless a token straddles the edge)."""
    mask = [False] * n
    for a, b in spans:
        i, j = (len(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (a, b))
        mask[i:j] = [True] * (min(j, n) - i)
    return mask
