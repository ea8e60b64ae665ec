"""A tune run's directory: what lives in it, who may reuse it, and one tune at a time in it.

    OUT/study.db          the Optuna study (SQLite): every trial, its parameters, curve and verdict
    OUT/trials/N/         trial N's training run (a `peftkit train` output directory)
    OUT/configs/N.yaml    the config it trained;   OUT/logs/N.log   its training log
    OUT/best.yaml         the best trial's config, which `peftkit train OUT/best.yaml` runs unchanged
    OUT/trials.md|csv|json, objective.png, importance.png    the report

A directory is taken when it is new or empty, or holds a tune run (its study.db). Anything else is
refused, and --overwrite removes only the entries above (a `best/` run trained from best.yaml stays).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

STUDY = "study.db"
LOCK = ".tune.lock"
OWN = (STUDY, f"{STUDY}-journal", f"{STUDY}-wal", f"{STUDY}-shm", "trials", "configs", "logs", "best.yaml",
       "trials.md", "trials.csv", "trials.json", "objective.png", "importance.png", LOCK)  # fmt: skip


def storage_url(out: Path) -> str:
    return f"sqlite:///{(out / STUDY).resolve()}"


def claim(out: Path) -> None:
    """Refuse an `out` that is a file, or a directory with other files and no study.db (nothing is
    written before this check)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in entries if name not in OWN]
    if STUDY not in entries and foreign:
        raise ConfigError(
            f"{out} is not empty and holds no tune run (no {STUDY}; it has {', '.join(foreign[:3])}): tune "
            "reuses only its own directories; choose a new or empty --out"
        )


def clear(out: Path) -> list[str]:
    """--overwrite: remove an earlier tune run's entries, only those; their names are returned."""
    removed = sorted(p.name for p in out.iterdir() if p.name in OWN and p.name != LOCK)
    for name in removed:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out` for this process: a second tune on the same directory is refused, not interleaved
    (tune marks trials it finds running as interrupted, which is only right when none is)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another peftkit tune is running in {out}; wait for it or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
