"""train()'s options in the words of both audiences: its errors reach command-line users (flags) and
Python callers (keyword arguments) alike, so a message names each way once."""

from __future__ import annotations


def option(name: str) -> str:
    """How to pass train()'s keyword `name`: '--allow-changed-inputs (allow_changed_inputs=True in
    Python)'."""
    return f"--{name.replace('_', '-')} ({name}=True in Python)"
