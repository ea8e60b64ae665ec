"""What makes a run resumable: the checkpoint to continue from (checked before the model loads), the
run directory made to agree with it, the checkpoints written on the way, and what a stop signal
(Ctrl-C, SIGTERM, SIGHUP) leaves and says. `loop.train` calls these; the loop itself only trains."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..errors import ConfigError, TrainingInterrupted, option
from ..io import remove_dir
from . import distributed
from .checkpoint import (
    INPUTS,
    Position,
    check_inputs,
    describe_changes,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    path_for,
    read_state,
    remove_after,
    save_checkpoint,
)
from .config import TrainConfig
from .optim import Trainable
from .report import truncate_metrics
from .run_dir import check_run_dir, local_inputs
from .setup import Prepared
from .step import check_weights_finite

Start = tuple[Path, dict[str, Any]]  # a checkpoint directory and its state.json


def starting_point(
    config: TrainConfig, out: Path, *, resume: bool | str | Path, overwrite: bool
) -> Start | None:
    """Before the model loads: the checkpoint `resume` names, read and checked (None for a new run),
    and an output directory this run may use."""
    if resume and overwrite:
        raise ConfigError(
            f"{option('resume')} continues the run in {out} and {option('overwrite')} deletes it: "
            "pass one of them"
        )
    start = None
    if resume:  # a missing or broken checkpoint fails before the model loads
        path = find_checkpoint(out / "checkpoints", resume)
        start = path, read_state(path, config.to_dict())
    check_run_dir(out, resume=bool(resume), overwrite=overwrite, inputs=local_inputs(config))
    return start


def resume_from(
    p: Prepared,
    trainable: Trainable,
    optimizer: torch.optim.Optimizer,
    path: Path,
    state: dict[str, Any],
    allow_changed_inputs: bool,
) -> Position:
    """Load checkpoint `path` and make the run directory agree with it: the later checkpoints,
    metrics and best adapter belong to the part of the run being redone."""
    step = state["position"].get("step", 0)
    if step >= p.total_steps:
        raise ConfigError(
            f"{path} is at step {step} and this run ends at step {p.total_steps}: nothing to train; "
            "raise max_steps (or epochs) to continue it"
        )
    changed = check_inputs(state, run_inputs(p), path, allow_changed_inputs)
    pos = load_checkpoint(path, state, trainable.names, trainable.masters, optimizer)
    trainable.masters_to_params()
    if changed:
        pos.extra.setdefault("changed_inputs", []).append({"step": pos.step, **changed})
    if p.dist.main:
        if changed:
            _say(
                f"WARNING: resuming from {path} although {describe_changes(changed)} "
                f"({option('allow_changed_inputs')}); the adapter's training.json records it under "
                "changed_inputs"
            )
        print(f"peftkit: resuming from {path} (step {pos.step})", flush=True)
        later = remove_after(p.out / "checkpoints", pos.step)
        if later:
            _say(f"removed the checkpoints after step {pos.step}, which this run redoes: {', '.join(later)}")
        truncate_metrics(p.out / "metrics.jsonl", pos.step)
        _drop_later_best(p.best_dir, pos.step)
    return pos


def _drop_later_best(best: Path, step: int) -> None:
    """Remove a best adapter written after checkpoint step `step` (the resumed run may save it again)."""
    if not best.is_dir():
        return
    try:
        saved_at = json.loads((best / "training.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        saved_at = None
    if not isinstance(saved_at, int) or saved_at > step:
        remove_dir(best)


def write_checkpoint(
    p: Prepared, pos: Position, trainable: Trainable, optimizer: torch.optim.Optimizer
) -> None:
    """Write the checkpoint of step `pos.step` (the main process; every process checks the weights first)."""
    check_weights_finite(p, pos.step, trainable)
    if p.dist.main:
        save_checkpoint(
            p.out / "checkpoints", pos, trainable.names, trainable.masters, optimizer, p.config.to_dict(),
            run_inputs(p), keep=p.config.keep_checkpoints,
        )  # fmt: skip


def run_inputs(p: Prepared) -> dict[str, str]:
    """What the run trains on (data hashes, base fingerprint), recorded in its checkpoints."""
    return {k: str(p.lineage.get(k, "")) for k in INPUTS}


def raise_interrupted(p: Prepared, pos: Position, signum: int) -> NoReturn:
    """After stop signal `signum` stopped the run with its checkpoint and last weights saved: say how
    to resume, and raise TrainingInterrupted."""
    path = path_for(p.out / "checkpoints", pos.step)
    if p.dist.main:
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        _say(
            f"{how} after step {pos.step} of {p.total_steps}; saved {path} and {p.last_dir}. "
            f"Run it again with {option('resume')} to continue from step {pos.step}"
        )
    distributed.shutdown(p.dist)
    raise TrainingInterrupted(pos.step, path, signum)


def abort_message(p: Prepared) -> str:
    """What a second stop signal (an abort in the middle of a step) leaves to resume from."""
    found = list_checkpoints(p.out / "checkpoints")
    if found:
        return f"aborted; {option('resume')} continues from the newest checkpoint, {found[-1]}"
    return (
        "aborted before any checkpoint was written: there is nothing to resume; start the run again "
        f"with {option('overwrite')}"
    )


def _say(text: str) -> None:
    print(f"peftkit: {text}", file=sys.stderr, flush=True)
