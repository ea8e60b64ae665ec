"""Where a config's paths point. In a config file (and an experiment file), a relative path is
relative to the file's folder, as in compose files, so `peftkit train examples/support_chat.yaml`
finds `data: data/support.jsonl` beside it from any working directory. On the command line and in
Python, a path is relative to the working directory (where the user typed it). `output_dir` is
always relative to the working directory: runs land where the user is. A saved config records
absolute paths, so it reruns from anywhere.

Only what is a path changes: `task:NAME` data, built-in model names and hub ids (`org/name` with no
such path beside the file) stay as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..base.catalog import BUILTIN_MODELS
from ..errors import ConfigError

DATA_KEYS = ("data", "val_data")  # a file or directory, unless "task:NAME"
PATH_KEYS = (*DATA_KEYS, "base")
TASK_PREFIX = "task:"


def resolve_file_paths(values: dict[str, Any], config_file: str | Path) -> dict[str, Any]:
    """A config file's mapping with its relative data and base paths made absolute against the
    file's folder (other keys untouched)."""
    folder = Path(config_file).parent
    out = dict(values)
    for key in DATA_KEYS:
        if isinstance(out.get(key), str):
            out[key] = data_path(out[key], folder, key)
    if isinstance(out.get("base"), str):
        out["base"] = base_path(out["base"], folder, "base")
    return out


def data_path(value: str, folder: Path, key: str) -> str:
    """`value` (data: a file, a directory or task:NAME) as read in a config file in `folder`."""
    if value.startswith(TASK_PREFIX):
        return value
    return file_path(value, folder, key)


def base_path(value: str, folder: Path, key: str) -> str:
    """`value` (a base model: a built-in name, a directory, a .gguf file or a hub id) as read in a
    config file in `folder`: a path when it exists beside the file or can only be a path."""
    if value in BUILTIN_MODELS or _is_absolute(value):
        return value
    if (folder / value).exists() or _only_a_path(value):
        return file_path(value, folder, key)
    _refuse_working_directory_path(value, folder, key)
    return value  # a hub id


def file_path(value: str, folder: Path, key: str) -> str:
    """`value`, a path in a config file in `folder`, made absolute (unless it already was)."""
    if _is_absolute(value):
        return value
    resolved = _absolute(folder / value)
    if not Path(resolved).exists():
        _refuse_working_directory_path(value, folder, key)
    return resolved


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """A config's values with the local paths among data, val_data and base made absolute against
    the working directory: what a saved config records, so it reruns from any directory."""
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and not value.startswith(TASK_PREFIX) and _local(value, key):
            out[key] = _absolute(Path(value).expanduser())
    return out


def same_path(a: Any, b: Any) -> bool:
    """Whether two values of a path key name the same thing: equal, or the same local path written
    two ways (relative to the working directory and absolute, say)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or TASK_PREFIX in (a[:5], b[:5]):
        return False
    return Path(a).expanduser().exists() and _absolute(Path(a).expanduser()) == _absolute(
        Path(b).expanduser()
    )


def _refuse_working_directory_path(value: str, folder: Path, key: str) -> None:
    """A path that is not beside the config file but is in the working directory was most likely
    written for the old rule (relative to the working directory): say how to write it now."""
    here = Path(value).expanduser()
    if not here.exists():
        return
    relative = os.path.relpath(here.absolute(), folder.absolute())
    raise ConfigError(
        f"{key}: {value!r} is not in {folder} (paths in a config file are relative to its folder), but "
        f"it is in the working directory: write {relative!r} or an absolute path"
    )


def _local(value: str, key: str) -> bool:
    if key == "base":
        return value not in BUILTIN_MODELS and (Path(value).expanduser().exists() or _only_a_path(value))
    return True


def _only_a_path(value: str) -> bool:
    # A hub id is "name" or "owner/name"; this mirrors base.sources' own reading of a base.
    return (
        value.startswith((".", "~"))
        or value.count("/") > 1
        or "\\" in value
        or value.lower().endswith(".gguf")
    )


def _is_absolute(value: str) -> bool:
    return Path(value).expanduser().is_absolute()


def _absolute(path: Path) -> str:
    """An absolute, normalised path (`..` folded, links kept: the user's names stay)."""
    return os.path.normpath(path.absolute())
