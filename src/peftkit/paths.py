"""The local files a command reads, and whether a place it writes overlaps them.

Checked before any work, so an output location can never be one of the command's own inputs: a merged
model written over its base, a report over the data, a training run inside the base model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

RELATIONS = ("is", "contains", "is inside")


def input_paths(
    base: str, adapter_dirs: Iterable[Path] = (), data: str | None = None
) -> list[tuple[str, Path]]:
    """(what, path) for each local file or directory a command reads: the adapter directories, the
    base's directory or GGUF file (a hub id has none here) and a data file or directory (a built-in
    task has none)."""
    from .base.sources import resolve_source

    source = resolve_source(base)  # no loading: classifies the name, or says why a path cannot load
    inputs = [("adapter directory", d.parent if d.is_file() else d) for d in map(Path, adapter_dirs)]
    if source.kind in ("dir", "gguf", "builtin"):
        inputs.append(
            ("base model " + ("directory" if source.kind == "dir" else "file"), Path(source.location))
        )
    if data is not None and Path(data).expanduser().exists():
        inputs.append(("data", Path(data)))
    return inputs


def input_clash(
    out: Path, inputs: list[tuple[str, Path]], relations: tuple[str, ...] = RELATIONS
) -> str | None:
    """How `out` overlaps an input ("is inside the adapter directory DIR"), or None when it does not:
    it is the input, holds it or lies inside it (symbolic links resolved); only `relations` count."""
    resolved = out.expanduser().resolve()
    for what, path in inputs:
        source = path.expanduser().resolve()
        if resolved == source:
            relation = "is"
        elif resolved in source.parents:
            relation = "contains"
        elif source in resolved.parents:
            relation = "is inside"
        else:
            continue
        if relation in relations:
            return f"{relation} the {what} {path}"
    return None
