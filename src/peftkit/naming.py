"""Adapter names: which are valid, and a valid one made from any text (e.g. a directory's name).

An adapter's name becomes a key of the `ParameterDict`/`ModuleDict` holding its weights, so it
must be a plain word that is not an attribute of those classes.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from torch import nn

from .core.rows import BASE_NAMES

_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_\-]+")
# Adapter names become keys of ParameterDict/ModuleDict, which refuse (or, worse, shadow) their attributes.
_RESERVED = frozenset(dir(nn.ParameterDict()) + dir(nn.ModuleDict()))


def adapter_name_problem(name: object, taken: Collection[str] = ()) -> str | None:
    """Why `name` cannot name a new adapter ("is invalid: ..."), or None when it can."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return "is invalid: use letters, digits, '_' and '-' only"
    if name in BASE_NAMES:
        return "means the base model (no adapter); pick another"
    if name in _RESERVED:
        return "is reserved (an attribute of torch modules); pick another"
    if name in taken:
        return "is taken: an adapter of that name already exists; pick another"
    return None


def adapter_name_from(text: str, taken: Collection[str] = ()) -> str:
    """A valid adapter name made from `text` (e.g. a directory name), never failing: characters other
    than letters, digits, '_' and '-' become '_' ("lora-v1.2" -> "lora-v1_2"), and a name that is
    reserved (an attribute of torch modules, e.g. "items"), names the base model or is in `taken` gets a number
    ("items" -> "items-2")."""
    stem = _NOT_NAME.sub("_", text).strip("_") or "adapter"
    name, k = stem, 1
    while name in taken or name in _RESERVED or name in BASE_NAMES:
        k += 1
        name = f"{stem}-{k}"
    return name
