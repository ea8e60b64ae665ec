"""Values read from files and command lines, checked the same way for configs and data files.

YAML and JSON hand over text, numbers and mappings that may not be what a field expects: `5e-4` as
text, int keys, 5000-digit integers, lone surrogates. These helpers turn each into a value or into the
words of one clear error line.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError


def number_from_text(value: Any) -> Any:
    """A string Python reads as a float becomes that float; anything else is returned unchanged.

    YAML 1.1 (PyYAML) reads `5e-4` as text, since its float syntax needs a dot (`5.0e-4`), so every
    float key accepts what `float()` accepts. NaN and infinities pass through here and are refused
    by the range checks, which then name the key.
    """
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_keys_are_text(data: dict, what: str, valid: Iterable[str]) -> None:
    """Refuse keys that are not strings (YAML reads `1: 2` as an int key) before they reach code
    that expects names."""
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(
                f"{what} key {key!r} ({type(key).__name__}) is not a field name; valid keys: {', '.join(valid)}"
            )


def short_repr(value: Any, limit: int = 60) -> str:
    """A bounded repr for error messages: a YAML alias bomb or a 5000-digit number must not flood
    (or hang) the one `error:` line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        sign = "a negative" if value < 0 else "an"
        return f"{sign} integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 60


def surrogate_problem(text: str) -> str | None:
    """What is wrong with `text` if it holds an unpaired surrogate, else None. A JSON or YAML escape
    like "\\ud800" without its pair makes one; no file or tokenizer takes it, and it would fail far
    from where it was read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds an unpaired surrogate (U+{ord(text[e.start]):04X} at character {e.start})"
    return None


def int_limit_problem(err: ValueError) -> str:
    """The message of Python's int-from-text limit (more than 4300 digits) without its advice to
    change an interpreter setting, which is no fix for a user's file."""
    return str(err).split("; use sys.set_int_max_str_digits")[0]
