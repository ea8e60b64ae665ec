"""The output directory of `compare` and `tune`: which directories a command may write into.

One rule for both: a directory is taken when it is new or empty, or when it holds the command's own
marker file (compare.json, tune.json), written the first time the command takes it. Anything else is
refused, and so are the working directory, the home directory and every parent of them, marked or not.
`--overwrite` (tune) removes only the entries the command itself writes, and only under its marker.

    kind = OutDir("tune", "tune.json", owned=("trials", "configs", "best.yaml", ...))
    check_out_dir(out, kind)          # before anything is written (or trained)
    removed = clear_out_dir(out, kind)  # --overwrite
    mark_out_dir(out, kind, {"experiment": "e.yaml"})
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import write_json_atomic


@dataclass(frozen=True)
class OutDir:
    """What a command writes into its directory."""

    command: str  # "compare", "tune": names the default directory and the marker's kind
    marker: str  # the file that says "this directory is the command's" (a JSON object with its kind)
    owned: tuple[str, ...] = ()  # the entries the command writes, the ones --overwrite may remove

    @property
    def kind(self) -> str:
        return f"peftkit {self.command}"


def default_out(command: str, experiment: Path) -> Path:
    """runs/COMMAND-NAME, NAME being the experiment file's name without its suffix."""
    return Path("runs") / f"{command}-{Path(experiment).stem}"


def is_marked(out: Path, kind: OutDir) -> bool:
    """Whether `out` holds `kind`'s marker (a JSON object naming the command)."""
    try:
        return json.loads((out / kind.marker).read_text()).get("kind") == kind.kind
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path, kind: OutDir, marked: bool | None = None) -> None:
    """Refuse an `out` the command may not write into (see the module docstring); writes nothing.
    `marked` overrides the marker test (tune accepts its runs from before its marker existed)."""
    out = Path(out).expanduser()
    flag = f"{kind.command} --out {out}"
    _refuse_special(out, flag)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} is a file; name a directory (new, empty, or an earlier {kind.command}'s)")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not (is_marked(out, kind) if marked is None else marked):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(
            f"{flag} holds other files ({shown}) and no {kind.marker}, so it is not a {kind.kind} run; "
            f"name a new or empty directory ({kind.command} never writes among other files)"
        )
    _check_writable(out, flag)


def _refuse_special(out: Path, flag: str) -> None:
    where = out.resolve()
    for name, special in (("working", Path.cwd()), ("home", Path.home())):
        special = special.resolve()
        if where == special or where in special.parents:
            what = "is" if where == special else "is a parent of"
            raise ConfigError(
                f"{flag} {what} the {name} directory ({special}); name a directory of its own, e.g. runs/NAME"
            )


def _check_writable(out: Path, flag: str) -> None:
    """The nearest existing directory on the way to `out` must let us create entries."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag}: {existing} is a file, so the directory cannot be made; choose another --out"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag}: cannot write to {existing} (permission denied); choose an --out you can write to, "
            f"or make {existing} writable"
        )


def clear_out_dir(out: Path, kind: OutDir) -> list[str]:
    """--overwrite: remove the entries the command wrote (never the marker, never anything else);
    nothing at all unless the marker is there. Returns the names removed."""
    out = Path(out).expanduser()
    if not is_marked(out, kind):
        return []
    removed = sorted(p.name for p in out.iterdir() if p.name in kind.owned and p.name != kind.marker)
    for name in removed:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def mark_out_dir(out: Path, kind: OutDir, facts: dict[str, Any] | None = None) -> None:
    """Make `out` (and its parents) and write the marker: `facts` plus the kind and the time."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker = {"kind": kind.kind, **(facts or {}), "updated": _now()}
        write_json_atomic(out / kind.marker, marker)
    except OSError as e:
        raise ConfigError(
            f"{kind.command} --out {out}: cannot write there ({e.strerror or e}); choose an --out you can "
            "write to"
        ) from None


def claim_out_dir(out: Path, kind: OutDir, facts: dict[str, Any] | None = None) -> None:
    """check_out_dir, then mark_out_dir: for a command that takes its directory in one go."""
    check_out_dir(out, kind)
    mark_out_dir(out, kind, facts)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
