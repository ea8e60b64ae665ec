"""Text at the edge of the server: chat messages -> prompt ids, generated ids -> text as it streams,
and stop strings. The engine sees token ids only; everything that knows about characters lives here.

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    text = TextStream(tokenizer, stop=["\\n\\n"])
    for out in outputs:                      # the engine's TokenOutputs, in order
        delta = text.add(out.token_id)       # "" while a character or a possible stop is incomplete
        if text.stopped: break               # a stop string matched: abort the engine request
    delta += text.finish()                   # whatever was held back
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import RequestError

MAX_STOP_STRINGS = 4  # as in the OpenAI API
ROLES = ("system", "user", "assistant")


def message_text(content: Any, index: int) -> str:
    """The text of one chat message's `content`: a string, or a list of {"type": "text", "text": ...}
    parts (joined); any other part (an image, audio) is refused, naming the message."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(
                f"messages[{index}].content: only text parts are supported, got type {part.get('type')!r}"
            )
        parts.append(part["text"])
    return "".join(parts)


def check_text(text: str, where: str) -> str:
    """`text`, if it is valid Unicode (JSON can carry lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"{where} is not valid Unicode text (a lone surrogate at index {e.start})"
        ) from None
    return text


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt ids for the next assistant turn, rendered with the tokenizer's chat template exactly
    as offline `peftkit generate` and training render it (`peftkit.data.encode.encode_prompt`)."""
    from ..data.encode import encode_prompt
    from ..data.example import Message

    if not messages:
        raise RequestError("messages must hold at least one message")
    chat = []
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        chat.append(Message(m["role"], check_text(message_text(m["content"], i), f"messages[{i}].content")))
    return list(encode_prompt(chat, tokenizer))


def check_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    """The stop strings of a request (at most four, none empty)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty")
    return stops


class StopStrings:
    """Cuts generated text at the first stop string, holding back only as much text as could still
    turn into one (the longest tail of the text that begins some stop string)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that is safe to emit now. Nothing emitted can hold the start of a stop string: a
        match starting there would make a longer held-back tail (proof by the longest-tail rule)."""
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = self._held_back()
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def _held_back(self) -> int:
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Generated token ids -> text deltas, decoded incrementally: each step decodes a short window
    (the previous token plus the new ones) so a multi-byte character split over tokens waits until it
    is complete and a tokenizer that drops leading spaces at the start of a decode keeps them. Special
    tokens (the end-of-sequence token) give no text, as in offline generation."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: context for the decoder
        self.read = 0  # ids before this are emitted
        self.stop = StopStrings(stop)
        self.text = ""  # everything emitted so far

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The text this token completes (possibly "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character, or a token with no text
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(after[len(before) :])

    def finish(self) -> str:
        """The rest: undecodable bytes left at the end (as U+FFFD) and text held back for stop strings."""
        rest = ""
        if self.read < len(self.ids) and not self.stopped:
            before = self._decode(self.ids[self.prefix : self.read])
            rest = self._decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)
        out = self._emit(rest)
        held = self.stop.flush()  # empty once a stop string matched
        self.text += held
        return out + held

    def _emit(self, delta: str) -> str:
        out = self.stop.feed(delta)
        self.text += out
        return out
