"""An Ollama Modelfile for an exported GGUF: `FROM`, `ADAPTER`, the chat template and the stop tokens.

    text = modelfile_text("dates.gguf", None, tokenizer)
    # ollama create dates -f dates.Modelfile && ollama run dates

Ollama's templates are Go templates, not Jinja. The tokenizer's Jinja chat template is rendered on
marker messages to find the text around each role's content (and what starts a conversation and an
answer), and that text is written as Go string literals around `{{ .Content }}`, one branch per role.
A template whose output cannot be taken apart this way is left out, with a comment saying so (Ollama
then reads `tokenizer.chat_template` from the GGUF file for the templates it knows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RequestError

_MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01"}


def modelfile_text(model: str, adapter: str | None, tokenizer: Any, note: str | None = None) -> str:
    """The Modelfile: FROM `model`, ADAPTER `adapter` (when given), TEMPLATE and PARAMETER stop;
    `note` is a comment line above FROM."""
    lines = ["# Written by peftkit. Create and run it with Ollama:", "#   ollama create NAME -f THIS_FILE"]
    lines += ["#   ollama run NAME", *([f"# {note}"] if note else []), f"FROM {model}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    parts = chat_parts(tokenizer)
    if parts is None:
        lines.append(
            "# The chat template could not be written in Ollama's syntax; Ollama reads the GGUF's own."
        )
    else:
        lines.append(f'TEMPLATE """{go_template(parts)}"""')
    for stop in stop_tokens(tokenizer, parts):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def chat_parts(tokenizer: Any) -> dict[str, str] | None:
    """The literal text of a conversation: `start` (before the first message when it is not a
    system message), `start_system` (before a leading system message), `<role>_open`/`<role>_close`
    around each role's content, and `answer` (the generation prompt). None when the template is
    missing or its output does not split cleanly around the markers."""
    if tokenizer is None or not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None

    def render(roles: list[str], answer: bool = False) -> str:
        messages = [{"role": r, "content": _MARK[r]} for r in roles]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer)

    try:
        user = render(["user"])
        pair = render(["user", "assistant"])
        parts = {"answer": render(["user"], answer=True).removeprefix(user)}
        parts.update(_around(pair.removeprefix(user), "assistant"))
        parts.update(_around(render(["user", "assistant", "user"]).removeprefix(pair), "user"))
        wrapped_user = parts["user_open"] + _MARK["user"] + parts["user_close"]
        if not user.endswith(wrapped_user):
            return None
        parts["start"] = user.removesuffix(wrapped_user)
        with_system = render(["system", "user"])
        if not with_system.endswith(wrapped_user):
            return None
        system_and_start = with_system.removesuffix(wrapped_user)
        head, _, tail = system_and_start.partition(_MARK["system"])
        parts |= {"start_system": "", "system_open": head, "system_close": tail}
    except Exception:  # a template that refuses these conversations (strict alternation, tools only, ...)
        return None
    leftover = any(m in text for text in parts.values() for m in _MARK.values())
    return None if leftover or not parts["answer"] else parts


def _around(text: str, role: str) -> dict[str, str]:
    """The text before and after one role's marker in `text` (one rendered message)."""
    head, found, tail = text.partition(_MARK[role])
    if not found:
        raise ValueError(f"no {role} marker")
    return {f"{role}_open": head, f"{role}_close": tail}


def go_template(parts: dict[str, str]) -> str:
    """The Go template of Ollama's `TEMPLATE` for `parts`; every literal is a quoted Go string, so
    no whitespace is trimmed and no brace is read as an action."""

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    roles = [
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{lit(parts[role + '_open'])}{{{{ .Content }}}}{lit(parts[role + '_close'])}"
        for i, role in enumerate(("system", "user", "assistant"))
    ]
    first = '{{ if eq (index .Messages 0).Role "system" }}' + lit(parts["start_system"])
    first += "{{ else }}" + lit(parts["start"]) + "{{ end }}"
    return first + "{{ range .Messages }}" + "".join(roles) + "{{ end }}{{ end }}" + lit(parts["answer"])


def stop_tokens(tokenizer: Any, parts: dict[str, str] | None) -> list[str]:
    """What ends an answer: the end-of-sequence token and the text that closes an assistant turn."""
    stops = []
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if isinstance(eos, str) and eos:
        stops.append(eos)
    close = (parts or {}).get("assistant_close", "").strip()
    if close and close not in stops:
        stops.append(close)
    return stops


def modelfile_path(out: Path) -> Path:
    """Where the Modelfile of the export `out` goes: beside it, `<name>.Modelfile`."""
    return out.with_suffix(".Modelfile")


def check_modelfile(out: Path, overwrite: bool) -> None:
    """Refuse an existing Modelfile before any work, as the GGUF file itself is refused."""
    if modelfile_path(out).exists() and not overwrite:
        raise RequestError(f"{modelfile_path(out)} exists; choose another name or pass --overwrite")


def write_modelfile(
    out: Path, model: str, adapter: str | None, tokenizer: Any, note: str | None = None
) -> Path:
    """Write the Modelfile of the export `out` beside it (atomically); return its path."""
    from ..io import atomic_file

    path = modelfile_path(out)
    with atomic_file(path) as tmp:
        tmp.write_text(modelfile_text(model, adapter, tokenizer, note), encoding="utf-8")
    return path
