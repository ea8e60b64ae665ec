"""Atomic writes, shared by everything peftkit puts on disk (adapters, the model cache, sidecars).

A reader sees the old version or the new one, never half of either. Temporary files and directories
are created with plain `open`/`mkdir` under unique names, so the result gets the usual umask
permissions (mkstemp/mkdtemp would leave them private to the writer).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal


def _temp_sibling(path: Path, kind: str) -> Path:
    path = Path(os.path.abspath(path))  # "." has no name: its sibling must not land inside it
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it is synced and renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    tmp.touch(exist_ok=False)
    mode = tmp.stat().st_mode & 0o777  # umask_mode: writers such as safetensors recreate files as 0600
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask_mode(directory: Path) -> int:
    """The permission bits a plain `open` gives a new file in `directory` (the umask's default).
    Some writers (safetensors, via a private temporary file) leave 0600 files, which would keep a
    saved adapter or model from other users; callers reset them to this."""
    probe = _temp_sibling(directory / "mode-probe", "tmp")
    probe.touch(exist_ok=False)
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as pretty, key-sorted JSON to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def unwritable_reason(path: Path) -> str | None:
    """Why files cannot be written into the directory `path` later (it need not exist yet), or None
    when they can. For a file, pass the directory it goes in.

    Checked before long work, so a bad location fails in a second rather than after an hour. The
    nearest existing directory on the way is probed by creating (and removing) a file in it: a mode
    check alone would pass for root, who still cannot write to a read-only or immutable location.
    Missing directories are not created here."""
    existing = path.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so no directory can be made there"
    probe = existing / f".peftkit-write-test-{uuid.uuid4().hex[:12]}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e})"
    return None


def is_nonempty_dir(path: Path) -> bool:
    """True when `path` is a directory with at least one entry."""
    return path.is_dir() and any(path.iterdir())


# The temporary directories `building_dir` is filling right now (absolute paths).
_building: set[Path] = set()


@contextmanager
def building_dir(final: Path, *, if_exists: Literal["keep", "replace", "error"] = "keep") -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to fill; on success it becomes `final`.

    If a non-empty `final` exists once ours is complete, `if_exists` decides: "keep" it and drop ours
    (another process won the race), "replace" it whole (see `replace_dir`: a reader sees the old
    directory or the new one, never a mix), or raise FileExistsError ("error"). On any error the
    temporary directory is removed and `final` is left as it was.

    A `final` that is itself the (still empty) temporary directory of an outer `building_dir`, such
    as an adapter saved as one part of a training save, is yielded as it is: the outer rename already
    makes the whole write atomic, so there is only ever one temporary directory.
    """
    # A link is written through: the directory it points to is replaced, and the link stays.
    final = final.resolve() if final.is_symlink() else Path(os.path.abspath(final))
    if final in _building and not is_nonempty_dir(final):
        yield final
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"cannot write to {final}: it exists and is not a directory")
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    _building.add(tmp.absolute())
    try:
        yield tmp
        if if_exists == "replace":
            replace_dir(tmp, final)
            return
        renamed = _rename_dir(tmp, final)
    finally:
        _building.discard(tmp.absolute())
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed
    if not renamed and if_exists != "keep":
        raise FileExistsError(f"{final} appeared while it was being written; it was left as it is")


def replace_dir(new: Path, final: Path) -> None:
    """Make directory `new` take the place of `final`, replacing whatever directory is there whole.

    On Linux the two are exchanged in one atomic step (renameat2 with RENAME_EXCHANGE), so every
    reader, and every crash, sees either the complete old directory or the complete new one.
    Elsewhere (or on a filesystem without exchange) the old one is renamed away, the new one renamed
    in and the old one deleted: a crash in between leaves `final` missing for a moment but never
    loses both (the old one survives as a hidden `.NAME.old-*` sibling).
    """
    if _rename_dir(new, final):  # nothing (or an empty directory) was there
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        return
    replace_by_renames(new, final)


def replace_by_renames(new: Path, final: Path) -> None:
    """`replace_dir` without an atomic exchange: rename the old away, the new in, delete the old.
    A crash between the first two renames leaves only `.NAME.old-*`: `restore_replaced` puts it back."""
    trash = _temp_sibling(final, "old")  # rename() cannot replace a non-empty directory
    os.rename(final, trash)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(trash, final)  # put the old one back rather than leave nothing
        raise
    shutil.rmtree(trash, ignore_errors=True)


def restore_replaced(parent: Path, name: str) -> Path | None:
    """When `parent/name` is missing but a `.NAME.old-*` directory is there, rename that back to
    `name` and return the path it came from (None when there was nothing to do).

    Such a leftover is the only copy left when `replace_by_renames` was interrupted after moving the
    old directory away; deleting it as debris would lose the directory. (`remove_dir`'s leftovers are
    `.NAME.del-*`: a deletion that was interrupted is finished, never undone.) Of several, the one
    renamed last comes back; the others stay as leftovers.
    """
    final = parent / name
    if final.exists() or final.is_symlink() or not parent.is_dir():
        return None
    old = [
        p
        for p in parent.iterdir()
        if is_leftover(p.name, of=name) and p.name.rpartition(".")[2].startswith("old-") and p.is_dir()
    ]
    if not old:
        return None
    newest = max(old, key=lambda p: p.stat().st_ctime)  # a rename updates the ctime
    os.rename(newest, final)
    return newest


def remove_dir(path: Path) -> None:
    """Delete a directory so that it disappears at once: rename it to a hidden sibling, then delete
    that. A crash mid-way leaves a `.NAME.del-*` leftover, never a half-deleted `NAME`."""
    trash = _temp_sibling(path, "del")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def is_leftover(name: str, of: str = "") -> bool:
    """Whether `name` is a temporary sibling these helpers create (`.NAME.tmp-*`, `.NAME.old-*`,
    `.NAME.del-*`),
    optionally only those of the entry named `of`: what an interrupted write leaves behind."""
    if not name.startswith(".") or (of and not name.startswith(f".{of}.")):
        return False
    kind, _, tail = name.rpartition(".")[2].partition("-")
    return kind in ("tmp", "old", "del") and len(tail) == 12


def copy_entries(src: Path, dst: Path, *, skip: set[str]) -> None:
    """Copy every entry of directory `src` except those named in `skip` into `dst` (hard links
    where possible: the copies only have to outlive `src`, which is about to be replaced)."""
    for item in src.iterdir():
        if item.name in skip or is_leftover(item.name):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, dst / item.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, dst / item.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn
