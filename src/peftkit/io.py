"""Atomic writes, shared by everything peftkit puts on disk (adapters, the model cache, sidecars).

A reader sees the old version or the new one, never half of either. Temporary files and directories
are created with plain `open`/`mkdir` under unique names, so the result gets the usual umask
permissions (mkstemp/mkdtemp would leave them private to the writer).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal


def _temp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it is synced and renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    tmp.touch(exist_ok=False)
    mode = tmp.stat().st_mode  # the umask's default; some writers (safetensors) recreate files as 0600
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as pretty, key-sorted JSON to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_nonempty_dir(path: Path) -> bool:
    """True when `path` is a directory with at least one entry."""
    return path.is_dir() and any(path.iterdir())


@contextmanager
def building_dir(
    final: Path, *, if_exists: Literal["keep", "replace", "error", "update"] = "keep"
) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to fill; on success it becomes `final`.

    If a non-empty `final` exists once ours is complete, `if_exists` decides: "keep" it and drop ours
    (another process won the race), "replace" it whole, "update" it by moving our files into it one
    by one (each atomically; files we did not write are kept), or raise FileExistsError ("error").
    On any error the temporary directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if is_nonempty_dir(final) and if_exists == "update":
            for item in tmp.iterdir():
                os.replace(item, final / item.name)
            return
        if is_nonempty_dir(final) and if_exists == "replace":
            trash = _temp_sibling(final, "old")  # rename() cannot replace a non-empty directory
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        renamed = _rename_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed
    if not renamed and if_exists != "keep":
        raise FileExistsError(f"{final} appeared while it was being written; it was left as it is")


def _rename_dir(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst`; False when `dst` is a non-empty directory (POSIX refuses those)."""
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"cannot write to {dst}: it exists and is not a directory")
    try:
        os.rename(src, dst)
    except OSError:
        if is_nonempty_dir(dst):
            return False
        raise
    return True
