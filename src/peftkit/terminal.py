"""Text from files and models made safe to print on a terminal."""

from __future__ import annotations

import unicodedata

# Bidirectional overrides reorder what a terminal shows ("Trojan Source"); other format characters
# (zero-width joiners in emoji) are harmless and kept.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, *, keep: str = "") -> str:
    """`text` safe to print: control characters (ESC starts the escape sequences that recolour,
    retitle or clear a terminal) and bidirectional overrides become Python escapes (`\\x1b`); the
    characters in `keep` (e.g. newlines in an answer) stay. For anything read from a file or a model."""
    return "".join(
        c
        if c in keep or (c not in _BIDI and unicodedata.category(c) != "Cc")
        else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
