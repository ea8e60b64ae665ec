"""What makes a run resumable: the checkpoint to continue from (checked before the model loads), the
run directory made to agree with it, the checkpoints written on the way, and what a stop signal
(Ctrl-C, SIGTERM, SIGHUP) leaves and says. `loop.train` calls these; the loop itself only trains."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

import peftkit.train.distributed as distributed

from ..errors import ConfigError, TrainingInterrupted, option
from ..io import building_dir, copy_entries, remove_dir
from .checkpoint import (
    BEST,
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
    on_disk = saved_step(p.best_dir)  # read by every process before the main one changes adapter-best
    lost = _best_is_lost(path, pos, on_disk)
    if lost:  # its loss alone, with no adapter, would be a claim without a file
        pos.best_val, pos.bad_evals = math.inf, 0
    distributed.barrier(p.dist)
    if p.dist.main:
        if changed:
            _say(
                f"WARNING: resuming from {path} although {describe_changes(changed)} "
                f"({option('allow_changed_inputs')}); the adapter's training.json records it under "
                "changed_inputs"
            )
        print(f"peftkit: resuming from {path} (step {pos.step})", flush=True)
        _say_new_end(p, state["config"])
        later = remove_after(p.out / "checkpoints", pos.step)
        if later:
            _say(f"removed the checkpoints after step {pos.step}, which this run redoes: {', '.join(later)}")
        truncate_metrics(p.out / "metrics.jsonl", pos.step)
        if lost:
            _say(
                f"{path} holds no copy of the best {p.best_dir.name} up to its step (it predates them), "
                "so this run chooses its best afresh from its own validations"
            )
        _match_best(p.best_dir, path, pos, on_disk)
    return pos


def _best_is_lost(checkpoint: Path, pos: Position, on_disk: int | None) -> bool:
    """Whether the best of the history up to `checkpoint` is gone: the checkpoint keeps no copy of it
    (one written before checkpoints did) and the best adapter on disk (saved at step `on_disk`) is
    missing or came later."""
    if (checkpoint / BEST).is_dir() or math.isinf(pos.best_val):
        return False
    return on_disk is None or on_disk > pos.step


def _match_best(best: Path, checkpoint: Path, pos: Position, on_disk: int | None) -> None:
    """Make `best` (adapter-best, saved at step `on_disk`) the best of the history being resumed: one
    written after the checkpoint, by the steps this run redoes, gives way to the checkpoint's copy,
    or goes when it has none."""
    kept = checkpoint / BEST
    if kept.is_dir():
        if on_disk == saved_step(kept):
            return
        with building_dir(best, if_exists="replace") as tmp:
            copy_entries(kept, tmp, skip=set())
        later = (
            f"; the one there was from step {on_disk}, which this run redoes" if on_disk is not None else ""
        )
        _say(
            f"restored {best.name} from {checkpoint.name}: step {saved_step(kept)}'s, the best up to step "
            f"{pos.step} (validation loss {pos.best_val:.4f}){later}"
        )
    elif best.is_dir() and (math.isinf(pos.best_val) or (on_disk or 0) > pos.step):
        remove_dir(best)  # (a lost best has had best_val reset to inf)
        _say(f"removed {best.name} (from step {on_disk or '?'}): it is not the best up to step {pos.step}")


def saved_step(weights: Path) -> int | None:
    """The step at which an adapter (or model) directory a run saved was written (its training.json)."""
    try:
        step = json.loads((weights / "training.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _say_new_end(p: Prepared, saved: dict[str, Any]) -> None:
    """One line when the resumed run ends at another step than the run that wrote its checkpoint."""
    c = p.config
    before = saved.get("max_steps") or saved.get("epochs", c.epochs) * p.steps_per_epoch
    if before == p.total_steps:
        return
    shown = lambda v: "null" if v is None else v  # noqa: E731
    changes = [
        f"{key} was {shown(saved.get(key))}, now {shown(getattr(c, key))}"
        for key in ("max_steps", "epochs")
        if saved.get(key) != getattr(c, key)
    ]
    schedule = (
        "" if c.schedule == "constant" and not c.warmup_ratio else "; the learning-rate schedule follows"
    )
    _say(f"{'; '.join(changes)}: this run ends at step {p.total_steps}, not {before}{schedule}")


def write_checkpoint(
    p: Prepared, pos: Position, trainable: Trainable, optimizer: torch.optim.Optimizer
) -> None:
    """Write the checkpoint of step `pos.step` (the main process; every process checks the weights first)."""
    check_weights_finite(p, pos.step, trainable)
    if p.dist.main:
        best = p.best_dir if not math.isinf(pos.best_val) and p.best_dir.is_dir() else None
        save_checkpoint(
            p.out / "checkpoints", pos, trainable.names, trainable.masters, optimizer, p.config.to_dict(),
            run_inputs(p), keep=p.config.keep_checkpoints, best=best,
        )  # fmt: skip


def run_inputs(p: Prepared) -> dict[str, str]:
    """What the run trains on (data hashes, base fingerprint), recorded in its checkpoints."""
    return {k: str(p.lineage.get(k, "")) for k in INPUTS}


def raise_interrupted(p: Prepared, pos: Position, signum: int, rerun: str | None = None) -> NoReturn:
    """After stop signal `signum` stopped the run with its checkpoint and last weights saved: say how
    to resume (or `rerun`, the caller's own advice), and raise TrainingInterrupted."""
    path = path_for(p.out / "checkpoints", pos.step)
    if p.dist.main:
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        advice = rerun or f"Run it again with {option('resume')} to continue from step {pos.step}"
        _say(f"{how} after step {pos.step} of {p.total_steps}; saved {path} and {p.last_dir}. {advice}")
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
