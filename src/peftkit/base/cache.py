"""peftkit's on-disk cache: where it lives and how entries are keyed (writes go through peftkit.io)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..io import building_dir, is_nonempty_dir, write_json_atomic

__all__ = ["building_dir", "is_nonempty_dir", "write_json_atomic"]


def default_cache_dir() -> Path:
    """The cache root: `$PEFTKIT_CACHE` when set, else `~/.cache/peftkit`."""
    env = os.environ.get("PEFTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftkit"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache root to use: the explicit `cache_dir`, else `default_cache_dir()`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def short_hash(*parts: str) -> str:
    """16 hex chars of sha256 over `parts`; NUL-separated so ('ab', 'c') and ('a', 'bc') differ."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def file_identity(path: Path) -> str:
    """Absolute path, size and mtime of a file: changes whenever the file is replaced or edited."""
    path = path.resolve()
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def dir_identity(path: Path) -> str:
    """Absolute path plus name, size and mtime of every file directly inside the directory."""
    path = path.resolve()
    lines = [str(path)]
    for entry in sorted(path.iterdir()):
        if entry.is_file():
            stat = entry.stat()
            lines.append(f"{entry.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(lines)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
