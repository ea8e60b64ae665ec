"""Resumable training checkpoints, in safetensors and JSON only (no pickles), written atomically.

checkpoints/step-00000120/
  trainable.safetensors   fp32 master weights of every trainable parameter, by name
  optimizer.safetensors   AdamW moments ("state.<i>.<key>") and the torch RNG states
  state.json             step, data position, early-stopping state, optimizer scalars and
                         groups, Python/NumPy RNG states, and the config the run was started with
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..formats.files import read_json, read_safetensors, write_safetensors
from ..io import building_dir, write_json_atomic

PREFIX = "step-"
# Keys that may differ between a run and its resumption (they don't change the result so far).
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "eval_every", "early_stopping_patience", "checkpoint_every",
    "keep_checkpoints", "output_dir", "tensorboard", "progress",
}  # fmt: skip


@dataclass
class Position:
    """Where a run stands: optimizer steps taken and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = float("inf")
    bad_evals: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    root: Path, pos: Position, names: list[str], masters: list[Tensor], optimizer: torch.optim.Optimizer,
    config: dict[str, Any], keep: int,
) -> Path:  # fmt: skip
    """Write checkpoint `root/step-<n>` atomically and prune all but the newest `keep`."""
    final = root / f"{PREFIX}{pos.step:08d}"
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
    }
    with building_dir(final, if_exists="replace") as tmp:
        write_safetensors(tmp / "trainable.safetensors", dict(zip(names, masters)), {"format": "pt"})
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors, {"format": "pt"})
        write_json_atomic(tmp / "state.json", state)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a half-written one is never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(
    path: Path,
    names: list[str],
    masters: list[Tensor],
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
) -> Position:
    """Restore masters, optimizer and RNG states from `path`; return the position to continue from."""
    state = read_json(path / "state.json", "checkpoint state")
    _check_same_run(state.get("config", {}), config, path)
    weights, _ = read_safetensors(path / "trainable.safetensors")
    if sorted(weights) != sorted(names):
        raise ConfigError(
            f"{path} holds other trainable parameters than this run; it belongs to another model/config"
        )
    with torch.no_grad():
        for name, master in zip(names, masters):
            master.copy_(weights[name])
    tensors, _ = read_safetensors(path / "optimizer.safetensors")
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        per_param.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(state["rng"]["python"]))
    kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return Position(**state["position"])


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = sorted(
        k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"cannot resume from {path}: the config changed in keys that shape the result ({details}); "
            "resume with the original config, or start a new run in another output_dir"
        )


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
