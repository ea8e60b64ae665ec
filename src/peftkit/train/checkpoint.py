"""Resumable training checkpoints, in safetensors and JSON only (no pickles), written atomically.

checkpoints/step-00000120/
  trainable.safetensors   fp32 master weights of every trainable parameter, by name
  optimizer.safetensors   AdamW moments ("state.<i>.<key>") and the torch RNG states
  state.json             step, data position, early-stopping state, optimizer scalars and
                         groups, Python/NumPy RNG states, the config the run was started with, and
                         the inputs it trained on (training/validation data hashes, base fingerprint)
  best/                  the run's best adapter (or model) so far, as adapter-best held it at this
                         step (hard links where possible: saves replace adapter-best whole, never
                         edit its files); absent before the first validation

A checkpoint is only used when all three files are there; anything else under checkpoints/ (a
half-written `.step-*.tmp-*`, a half-deleted one) is a leftover of an interrupted run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import AdapterFileError, CheckpointError, ConfigError, option
from ..formats.files import read_json, read_safetensors, write_safetensors
from ..io import building_dir, copy_entries, is_leftover, remove_dir, write_json_atomic
from .config_paths import PATH_KEYS, same_path

PREFIX = "step-"
BEST = "best"  # the best adapter so far, inside a checkpoint
FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")
# Keys that may differ between a run and its resumption (they don't change the result so far).
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "eval_every", "early_stopping_patience", "checkpoint_every",
    "keep_checkpoints", "output_dir", "tensorboard", "progress",
}  # fmt: skip
INPUTS = {
    "dataset_hash": "training data",
    "val_dataset_hash": "validation data",
    "base_fingerprint": "base model",
}


@dataclass
class Position:
    """Where a run stands: optimizer steps taken and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = float("inf")
    bad_evals: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # facts that travel with the run (JSON)


def save_checkpoint(
    root: Path, pos: Position, names: list[str], masters: list[Tensor], optimizer: torch.optim.Optimizer,
    config: dict[str, Any], inputs: dict[str, str], keep: int, best: Path | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `root/step-<n>` atomically and prune all but the newest `keep`. `best`, the
    run's best adapter directory so far, goes with it: a run resumed from here gets it back."""
    final = path_for(root, pos.step)
    opt = optimizer.state_dict()
    opt_tensors: dict[str, Tensor] = {}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                opt_tensors[f"state.{index}.{key}"] = value
            else:
                opt_scalars.setdefault(str(index), {})[key] = value
    opt_tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            opt_tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    state = {
        "format": 1,
        "position": {k: v for k, v in vars(pos).items()},
        "optimizer": {"scalars": opt_scalars, "param_groups": opt["param_groups"]},
        "rng": {
            "python": _jsonable(random.getstate()),
            "numpy": [
                np_state[0],
                np_state[1].tolist(),
                int(np_state[2]),
                int(np_state[3]),
                float(np_state[4]),
            ],
        },
        "config": config,
        "inputs": inputs,
    }
    with building_dir(final, if_exists="replace") as tmp:
        write_safetensors(tmp / "trainable.safetensors", dict(zip(names, masters)), {"format": "pt"})
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors, {"format": "pt"})
        write_json_atomic(tmp / "state.json", state)
        if best is not None:
            (tmp / BEST).mkdir()
            copy_entries(best, tmp / BEST, skip=set())
    for old in list_checkpoints(root)[:-keep]:
        remove_dir(old)  # at once: never a half-deleted step-N that still looks usable
    return final


def path_for(root: Path, step: int) -> Path:
    """The directory of the checkpoint after optimizer step `step`."""
    return root / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory's name says (`step-00000120` -> 120); None for other names."""
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a half-written or half-deleted one is never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and _complete(p)]
    return sorted(found, key=step_of)


def remove_incomplete(root: Path) -> list[str]:
    """Delete what interrupted runs left under `root` (temporary and incomplete checkpoint
    directories); return their names."""
    if not root.is_dir():
        return []
    gone = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and (is_leftover(p.name) or (p.name.startswith(PREFIX) and not _complete(p))):
            remove_dir(p)
            gone.append(p.name)
    return gone


def remove_after(root: Path, step: int) -> list[str]:
    """Delete the checkpoints under `root` written after step `step` (complete or not); return their
    names. A run resumed from an older checkpoint redoes those steps: left in place, the abandoned
    ones would outrank (and get) its new checkpoints pruned, and a later resume would pick them."""
    later = (
        sorted((p for p in root.iterdir() if (step_of(p) or 0) > step), key=step_of) if root.is_dir() else []
    )
    for p in later:
        remove_dir(p)
    return [p.name for p in later]


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def find_checkpoint(root: Path, resume: bool | str | Path) -> Path:
    """The checkpoint `resume` names: the newest under `root` (True) or the given directory."""
    if resume is True:
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(
                f"no checkpoint to resume from in {root}: a run writes one every checkpoint_every steps "
                f"and when it is stopped with Ctrl-C; start a new run instead ({option('overwrite')}, or "
                "another output_dir)"
            )
        return found[-1]
    path = Path(resume)
    if not path.is_dir() or not _complete(path):
        raise CheckpointError(
            f"cannot resume from {path}: not a complete checkpoint directory (it needs {', '.join(FILES)})"
        )
    return path


def read_state(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state.json, checked for shape and for the same result-shaping config."""
    try:
        state = read_json(path / "state.json", "checkpoint state")
    except AdapterFileError as e:
        raise unusable(path, str(e)) from None
    for key in ("position", "optimizer", "rng", "config"):
        if not isinstance(state.get(key), dict):
            raise unusable(path, f"its state.json has no valid {key!r} section")
    try:
        pos = Position(**state["position"])
    except TypeError as e:
        raise unusable(path, f"its state.json has an invalid position ({e})") from None
    if not _valid_position(pos) or not isinstance(state.get("inputs", {}), dict):
        raise unusable(path, f"its state.json has an invalid position ({state['position']})")
    _check_same_run(state["config"], config, path)
    return state


def _valid_position(pos: Position) -> bool:
    counts = (pos.step, pos.epoch, pos.batch_in_epoch, pos.bad_evals)
    best = pos.best_val
    return (
        all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
        and isinstance(best, (int, float))
        and not isinstance(best, bool)
        and not math.isnan(best)
        and isinstance(pos.extra, dict)
        and isinstance(pos.extra.get("changed_inputs", []), list)
    )


def check_inputs(state: dict[str, Any], current: dict[str, str], path: Path, allow: bool) -> dict[str, Any]:
    """{key: [in the checkpoint, now]} for every input (data, base model) that changed since the
    checkpoint; a CheckpointError naming both hashes unless `allow`."""
    saved = state.get("inputs") or {}  # checkpoints written before inputs were recorded have none
    changed = {
        k: [saved[k], current.get(k, "")] for k in INPUTS if k in saved and saved[k] != current.get(k, "")
    }
    if changed and not allow:
        raise CheckpointError(
            f"cannot resume from {path}: {describe_changes(changed)}. Resume with the inputs it was "
            f"trained on, start a new run ({option('overwrite')}, or another output_dir), or pass "
            f"{option('allow_changed_inputs')} to continue on the new inputs anyway"
        )
    return changed


def describe_changes(changed: dict[str, Any]) -> str:
    """'the training data changed (sha256 1a2b.. in the checkpoint, 3c4d.. now)', joined by '; '."""
    return "; ".join(
        f"the {INPUTS[k]} changed ({_short(old)} in the checkpoint, {_short(new)} now)"
        for k, (old, new) in changed.items()
    )


def load_checkpoint(
    path: Path,
    state: dict[str, Any],
    names: list[str],
    masters: list[Tensor],
    optimizer: torch.optim.Optimizer,
) -> Position:
    """Restore masters, optimizer and RNG states from `path` (whose `state` was read by `read_state`);
    return the position to continue from. The files are checked before anything is changed."""
    weights = _read_tensors(path / "trainable.safetensors", path)
    _check_saved_weights(weights, names, masters, path)
    tensors = _read_tensors(path / "optimizer.safetensors", path)
    per_param = _optimizer_state(tensors, state, optimizer, path)
    try:
        rng_python = _tuplify(state["rng"]["python"])
        kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        rng_numpy = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
        random.setstate(rng_python)
        np.random.set_state(rng_numpy)
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise unusable(
            path, f"its optimizer or RNG state does not fit this run ({type(e).__name__}: {e})"
        ) from None
    with torch.no_grad():
        for name, master in zip(names, masters):
            master.copy_(weights[name])
    return Position(**state["position"])


def _read_tensors(file: Path, path: Path) -> dict[str, Tensor]:
    try:
        return read_safetensors(file)[0]
    except AdapterFileError as e:
        raise unusable(path, str(e)) from None


def _check_saved_weights(
    weights: dict[str, Tensor], names: list[str], masters: list[Tensor], path: Path
) -> None:
    if sorted(weights) != sorted(names):
        raise ConfigError(
            f"{path} holds other trainable parameters than this run; it belongs to another model/config"
        )
    for name, master in zip(names, masters):
        if weights[name].shape != master.shape:
            raise unusable(
                path, f"{name} has shape {tuple(weights[name].shape)}, this run's is {tuple(master.shape)}"
            )
    bad = non_finite(weights)
    if bad:
        raise unusable(
            path,
            f"{len(bad)} of its weight tensors hold NaN or inf (e.g. {bad[0]}): the run had diverged "
            "before it was written",
        )


def _optimizer_state(
    tensors: dict[str, Tensor], state: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path
) -> dict[int, dict[str, Any]]:
    """The optimizer's per-parameter state from the file, checked against this run's parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        parts = key.split(".", 2)  # state.<parameter index>.<name>
        i = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else len(params)
        if i >= len(params) or (value.dim() > 0 and value.shape != params[i].shape):
            raise unusable(path, f"its optimizer state {key} does not fit this run's parameters")
        if non_finite({key: value}):
            raise unusable(path, f"its optimizer state {key} holds NaN or inf")
        per_param.setdefault(i, {})[parts[2]] = value
    scalars = state["optimizer"].get("scalars", {})
    if not isinstance(scalars, dict) or not all(
        i.isdigit() and isinstance(v, dict) for i, v in scalars.items()
    ):
        raise unusable(path, "its optimizer scalars in state.json are malformed")
    for index, values in scalars.items():
        per_param.setdefault(int(index), {}).update(values)
    return per_param


def unusable(path: Path, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be used, with the ways forward."""
    older = [p for p in list_checkpoints(path.parent) if (step_of(p) or 0) < (step_of(path) or 0)]
    fallback = (
        f"move it out of {path.parent} and resuming continues from the older {older[-1].name}"
        if older
        else "there is no older checkpoint to fall back on"
    )
    return CheckpointError(
        f"cannot resume from checkpoint {path}: {problem}; {fallback}, or start a new run "
        f"({option('overwrite')}, or another output_dir)"
    )


def non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES and not _same(k, saved.get(k), current.get(k))
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"cannot resume from {path}: the config changed in keys that shape the result ({details}); "
            "resume with the original config, or start a new run in another output_dir"
        )


def _same(key: str, saved: Any, current: Any) -> bool:
    """A path written another way (relative, or absolute as a config file's paths now are) is the same."""
    return same_path(saved, current) if key in PATH_KEYS else saved == current


def _short(value: str) -> str:
    algo, _, digest = str(value).partition(":")
    return f"{algo} {digest[:12]}" if digest else repr(value) if value else "none"


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
