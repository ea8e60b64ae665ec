"""The one shape every dataset row takes inside peftkit: a chat conversation.

Files in any supported format (chat `messages`, `prompt`/`completion`, alpaca
`instruction`/`input`/`output`) and the built-in tasks all become `Example`s; encoding renders them
with the tokenizer's chat template and puts the loss on the assistant turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Example:
    """One conversation. The assistant turns are what the model learns to produce (the last one is
    the reference answer for evaluation); `source` says where it came from ("file.jsonl:12")."""

    messages: tuple[Message, ...]
    source: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Every message before the last assistant turn (what a model is given at evaluation)."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        """The content of the last assistant turn (the reference answer)."""
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    @classmethod
    def from_pair(
        cls, prompt: str, completion: str, *, system: str | None = None, source: str = ""
    ) -> Example:
        """A single-turn example: optional system prompt, one user turn, one assistant turn."""
        turns = [Message("system", system)] if system else []
        turns += [Message("user", prompt), Message("assistant", completion)]
        return cls(tuple(turns), source)

    def to_dict(self) -> dict:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    def with_system(self, system: str | None) -> Example:
        """This conversation with a system turn first, unless it already has one (or system is None)."""
        turns = with_system(self.messages, system)
        return self if turns is self.messages else Example(turns, self.source, self.meta)


def with_system(turns: tuple[Message, ...], system: str | None) -> tuple[Message, ...]:
    """`turns` with a system turn `system` in front, unless they start with one (or system is None)."""
    if system is None or (turns and turns[0].role == "system"):
        return turns
    return (Message("system", system), *turns)
