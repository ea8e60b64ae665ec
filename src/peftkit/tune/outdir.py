"""A tune run's directory: what lives in it, who may reuse it, and one tune at a time in it.

    OUT/tune.json         marks the directory as a tune run's (written first)
    OUT/study.db          the Optuna study (SQLite): every trial, its parameters, curve and verdict
    OUT/trials/N/         trial N's training run (a `peftkit train` output directory)
    OUT/configs/N.yaml    the config it trained;   OUT/logs/N.log   its training log
    OUT/best.yaml         the best trial's config, which `peftkit train OUT/best.yaml` runs unchanged
    OUT/trials.md|csv|json, objective.png, importance.png    the report

The rule is compare's (peftkit.experiment.outdir): a directory is taken when it is new or empty, or
holds tune.json; anything else is refused, as are the working and home directories. --overwrite removes
only the entries above, and only under tune.json (a `best/` run trained from best.yaml stays).
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from ..experiment.outdir import OutDir, check_out_dir, clear_out_dir, is_marked, mark_out_dir

STUDY = "study.db"
STUDY_NAME = "peftkit-tune"
LOCK = ".tune.lock"  # not among OUT_DIR.owned: --overwrite runs while this process holds it
OUT_DIR = OutDir(
    "tune", "tune.json",
    owned=(STUDY, f"{STUDY}-journal", f"{STUDY}-wal", f"{STUDY}-shm", "trials", "configs", "logs", "best.yaml",
           "trials.md", "trials.csv", "trials.json", "objective.png", "importance.png", "tune.json"),
)  # fmt: skip


def storage_url(out: Path) -> str:
    return f"sqlite:///{(out / STUDY).resolve()}"


def claim(out: Path) -> None:
    """Refuse an `out` tune may not use (nothing is written by this check)."""
    # A tune run from before tune.json existed is one too (take() marks it).
    check_out_dir(out, OUT_DIR, marked=is_marked(out, OUT_DIR) or _holds_tune_study(out))


def take(out: Path, experiment: Path | None, overwrite: bool) -> list[str]:
    """Mark `out` as tune's (the caller holds its lock); with `overwrite`, first remove an earlier tune
    run's entries, only those. Returns the names removed."""
    if not is_marked(out, OUT_DIR) and _holds_tune_study(out):
        mark_out_dir(out, OUT_DIR, {"experiment": str(experiment)})
    removed = clear_out_dir(out, OUT_DIR) if overwrite else []
    mark_out_dir(out, OUT_DIR, {"experiment": str(experiment)})
    return removed


def _holds_tune_study(out: Path) -> bool:
    """Whether out/study.db is an SQLite file holding an Optuna study named peftkit-tune."""
    db = out / STUDY
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            names = {row[0] for row in con.execute("SELECT study_name FROM studies")}
    except sqlite3.Error:
        return False
    return STUDY_NAME in names


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
