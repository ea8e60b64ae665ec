"""peftkit's on-disk cache: where it lives, how entries are keyed, and atomic writes into it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal


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


def is_nonempty_dir(path: Path) -> bool:
    """True when `path` is a directory with at least one entry."""
    return path.is_dir() and any(path.iterdir())


@contextmanager
def building_dir(final: Path, *, if_exists: Literal["keep", "replace", "error"] = "keep") -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to fill; on success it is renamed to `final`.

    Readers therefore see either no `final` or a complete one. If a non-empty `final` exists by
    the time ours is complete (another process won the race), `if_exists` decides: "keep" theirs
    and drop ours, "replace" theirs (moved aside, then deleted), or raise FileExistsError ("error").
    On any error the temporary directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it 0700) so the result gets the usual umask permissions.
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if if_exists == "replace" and is_nonempty_dir(final):
            # rename() cannot replace a non-empty directory, so move the old one out of the way first.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        renamed = _rename_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed
    if not renamed and if_exists != "keep":
        raise FileExistsError(f"{final} appeared while it was being written; it was left as it is")


def _rename_dir(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst`; False when `dst` is a non-empty directory (POSIX refuses those)."""
    try:
        os.rename(src, dst)
    except OSError:
        if is_nonempty_dir(dst):
            return False
        raise
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` via a temporary file and `os.replace`, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
