"""The training run, as one readable function: setup -> fit -> validate -> save.

    from peftkit.train import TrainConfig, train
    result = train(TrainConfig(data="task:dates", max_steps=200))
    print(result.adapter_dir)

No callbacks: the loop below is the whole story. Each optimizer step takes `grad_accum`
micro-batches; the loss is the mean cross-entropy over every labelled (answer) token of the global
batch, across processes and micro-batches alike, so the result does not depend on how the batch
is split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.batching import collate, length_grouped_batches
from ..data.encode import Encoded
from ..errors import ConfigError, TrainingDivergedError, TrainingInterrupted
from ..io import atomic_file, remove_dir
from . import distributed
from .checkpoint import (
    INPUTS,
    Position,
    check_inputs,
    describe_changes,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from .config import TrainConfig, save_config
from .optim import Trainable, lr_at, make_optimizer, set_lr
from .report import Reporter, plot_losses, read_metrics, truncate_metrics
from .setup import Prepared, check_run_dir, clear_run, prepare, remove_leftovers, run_dir
from .step import (
    StopOnCtrlC,
    batch_loss,
    check_finite,
    validation_loss,
    weights_are_finite,
)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path | None  # the adapter to use (best by validation loss, else the last); None for full
    model_dir: Path | None  # full fine-tuning: the saved model directory
    steps: int
    final_loss: float | None
    best_val_loss: float | None
    seconds: float
    tokens_per_second: float
    summary: dict[str, Any] = field(default_factory=dict)


def train(
    config: TrainConfig,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    allow_changed_inputs: bool = False,
) -> TrainResult:
    """Fine-tune `config.base` on `config.data`.

    The output directory must not hold another run (checked before the model loads): `resume`
    continues it from its newest checkpoint (True) or from a given checkpoint directory;
    `overwrite` deletes the old run's files (only those) first. A checkpoint trained on other data
    or another base model is refused unless `allow_changed_inputs`, which says so loudly and records
    the change in the adapter's training.json. Ctrl-C stops after the current step, saves a
    checkpoint and the last adapter, and raises TrainingInterrupted (a KeyboardInterrupt); a second
    Ctrl-C aborts at once.
    """
    out = run_dir(config)
    if resume and overwrite:
        raise ConfigError(f"--resume continues the run in {out} and --overwrite deletes it: pass one of them")
    d = distributed.init()
    start = None
    if resume:  # a missing or broken checkpoint fails before the model loads
        path = find_checkpoint(out / "checkpoints", resume)
        start = path, read_state(path, config.to_dict())
    check_run_dir(out, resume=bool(resume), overwrite=overwrite)
    distributed.barrier(d)  # every process has checked the directory before the main one changes it
    p = prepare(config, d)
    _claim(p, overwrite=overwrite)
    trainable = Trainable.of(p.net)
    optimizer = make_optimizer(trainable, config)
    pos = _resume(p, trainable, optimizer, *start, allow_changed_inputs) if start else Position()
    if d.main:
        print(p.describe(trainable, pos), file=sys.stderr, flush=True)
    reporter = Reporter(
        p.out,
        total_steps=p.total_steps,
        initial_step=pos.step,
        enabled=d.main,
        progress=config.progress,
        tensorboard=config.tensorboard,
    )
    if d.main:
        save_config(config, p.out / "config.yaml")
    started = time.perf_counter()
    try:
        with StopOnCtrlC() as stop:
            pos, tokens, stopped = _fit(p, trainable, optimizer, pos, reporter, stop)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread
        reporter.message(_abort_message(p))
        raise
    finally:
        reporter.close()
    seconds = time.perf_counter() - started
    if stopped:
        _stop(p, pos, trainable, optimizer, seconds, tokens)
    result = _save(p, pos, trainable, seconds, tokens)
    distributed.shutdown(d)
    return result


def _claim(p: Prepared, *, overwrite: bool) -> None:
    """Clear the old run (overwrite) or what interrupted writes left behind, once the data and the
    model have loaded: a failure before this point leaves the directory as it was."""
    if p.dist.main:
        p.out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no directory
        gone = clear_run(p.out) if overwrite else remove_leftovers(p.out)
        if gone:
            what = "the previous run's files" if overwrite else "leftovers of an interrupted run"
            print(f"peftkit: removed {what} from {p.out}: {', '.join(gone)}", file=sys.stderr, flush=True)
    distributed.barrier(p.dist)


def _fit(
    p: Prepared,
    trainable: Trainable,
    optimizer: torch.optim.Optimizer,
    pos: Position,
    reporter: Reporter,
    stop: StopOnCtrlC,
) -> tuple[Position, int, bool]:
    """Optimizer steps until max_steps, the last epoch, early stopping or Ctrl-C. Returns the final
    position, the number of (padded) tokens processed, and whether Ctrl-C stopped the run early."""
    c, d = p.config, p.dist
    tokens_seen = 0
    while pos.step < p.total_steps:
        batches = epoch_batches(p.train_set, c, d.world, pos.epoch)
        while pos.batch_in_epoch < len(batches) and pos.step < p.total_steps:
            window = batches[pos.batch_in_epoch : pos.batch_in_epoch + c.grad_accum]
            t0 = time.perf_counter()
            loss, padded, real = _step(p, trainable, optimizer, window, pos.step)
            dt = time.perf_counter() - t0
            pos.step += 1
            pos.batch_in_epoch += len(window)
            tokens_seen += padded
            lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["scale"]
            epoch = pos.epoch + pos.batch_in_epoch / len(batches)
            reporter.log(
                {"step": pos.step, "epoch": epoch, "loss": loss, "lr": lr, "tokens_per_s": padded / dt}
            )
            reporter.progress(1, loss=f"{loss:.4f}", tok_s=f"{padded / dt:.0f}")
            end_of_epoch = pos.batch_in_epoch >= len(batches)
            validate_now = _due(pos.step, c.eval_every) or (c.eval_every == 0 and end_of_epoch)
            if validate_now and _validate(p, pos, trainable, reporter):
                return pos, tokens_seen, False  # early stopping
            if _due(pos.step, c.checkpoint_every):
                _checkpoint(p, pos, trainable, optimizer)
            # Checked only once the step's validation and checkpoint are done, so that resuming
            # gives exactly the run that was not interrupted.
            if stop.now(d) and pos.step < p.total_steps:
                return pos, tokens_seen, True
        if pos.batch_in_epoch >= len(batches):
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
    return pos, tokens_seen, False


def _step(
    p: Prepared, trainable: Trainable, optimizer: torch.optim.Optimizer, window: list[list[int]], index: int
) -> tuple[float, int, int]:
    """Optimizer step `index` (from 0) over `window` (global micro-batches). Returns (mean loss over
    the global batch, padded tokens this process ran, labelled tokens of the global batch). A loss or
    gradient that is not finite stops the run before the update (TrainingDivergedError)."""
    lr = lr_at(index, p.total_steps, p.config)
    loss_sum, padded, labelled = accumulate(p, window)
    loss = distributed.all_sum(loss_sum, p.dist) / max(labelled, 1)
    check_finite(loss, "training loss", index + 1, lr)
    distributed.all_sum_grads(trainable.params, p.dist)
    trainable.grads_to_masters()
    if p.config.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(trainable.masters, p.config.max_grad_norm)
        check_finite(float(norm), "gradient norm", index + 1, lr)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainable.masters_to_params()
    return loss, padded, labelled


def accumulate(p: Prepared, window: list[list[int]]) -> tuple[float, int, int]:
    """Forward and backward over this process's share of each micro-batch in `window`, leaving the
    gradient of (summed cross-entropy / labelled tokens of the whole window) in `.grad`. Returns
    (this process's loss sum, its padded tokens, the window's labelled tokens)."""
    d = p.dist
    p.net.train()
    # Every process knows the whole window, so the global number of labelled tokens needs no message.
    labelled = sum(p.label_counts[i] for batch in window for i in batch)
    loss_sum, padded = 0.0, 0
    for batch in window:
        part = [p.train_set[i] for i in batch[d.rank :: d.world]]
        if not part:
            continue
        inputs = {k: v.to(d.device) for k, v in collate(part, p.pad_id).items()}
        loss = batch_loss(p, inputs)
        (loss / labelled).backward()
        loss_sum += loss.item()
        padded += inputs["input_ids"].numel()
    return loss_sum, padded, labelled


def _validate(p: Prepared, pos: Position, trainable: Trainable, reporter: Reporter) -> bool:
    """Validation loss; saves the best adapter. True when early stopping says stop."""
    if not p.val_set:
        return False
    val = validation_loss(p)
    reporter.log({"step": pos.step, "val_loss": val})
    reporter.message(f"step {pos.step}: validation loss {val:.4f}")
    if val < pos.best_val:
        pos.best_val, pos.bad_evals = val, 0
        _check_weights(p, pos, trainable)
        if p.dist.main:
            p.save_weights(_best_dir(p), pos, trainable)
    else:
        pos.bad_evals += 1
    patience = p.config.early_stopping_patience
    if patience and pos.bad_evals >= patience:
        reporter.message(f"early stopping: no better validation loss in {patience} validations")
        return True
    return False


def _checkpoint(p: Prepared, pos: Position, trainable: Trainable, optimizer: torch.optim.Optimizer) -> Path:
    """Write a checkpoint (the main process; every process checks the weights first)."""
    _check_weights(p, pos, trainable)
    path = p.out / "checkpoints" / f"step-{pos.step:08d}"
    if p.dist.main:
        save_checkpoint(
            p.out / "checkpoints", pos, trainable.names, trainable.masters, optimizer, p.config.to_dict(),
            _inputs(p), keep=p.config.keep_checkpoints,
        )  # fmt: skip
    return path


def _inputs(p: Prepared) -> dict[str, str]:
    """What the run trains on (data hashes, base fingerprint), recorded in its checkpoints."""
    return {k: str(p.lineage.get(k, "")) for k in INPUTS}


def _check_weights(p: Prepared, pos: Position, trainable: Trainable) -> None:
    """Never save NaN or inf weights (they can follow from a non-finite gradient without clipping)."""
    if not weights_are_finite(trainable.masters):
        raise TrainingDivergedError(
            f"step {pos.step}: the trained weights hold NaN or inf; nothing from this step was saved. "
            f"Lower the learning rate (lr is {p.config.lr:g}) or set max_grad_norm, then start again "
            "(--overwrite)"
        )


def _resume(
    p: Prepared,
    trainable: Trainable,
    optimizer: torch.optim.Optimizer,
    path: Path,
    state: dict[str, Any],
    allow_changed_inputs: bool,
) -> Position:
    """Load checkpoint `path` and make the run directory agree with it: later metrics and a best
    adapter saved after it belong to the part of the run being redone."""
    step = state["position"].get("step", 0)
    if step >= p.total_steps:
        raise ConfigError(
            f"{path} is at step {step} and this run ends at step {p.total_steps}: nothing to train; "
            "raise max_steps (or epochs) to continue it"
        )
    changed = check_inputs(state, _inputs(p), path, allow_changed_inputs)
    pos = load_checkpoint(path, state, trainable.names, trainable.masters, optimizer)
    trainable.masters_to_params()
    if changed:
        pos.extra.setdefault("changed_inputs", []).append({"step": pos.step, **changed})
    if p.dist.main:
        if changed:
            print(
                f"peftkit: WARNING: resuming from {path} although {describe_changes(changed)} "
                "(--allow-changed-inputs); the adapter's training.json records it under changed_inputs",
                file=sys.stderr,
                flush=True,
            )
        print(f"peftkit: resuming from {path} (step {pos.step})", flush=True)
        truncate_metrics(p.out / "metrics.jsonl", pos.step)
        _drop_later_best(_best_dir(p), pos.step)
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


def _stop(
    p: Prepared,
    pos: Position,
    trainable: Trainable,
    optimizer: torch.optim.Optimizer,
    seconds: float,
    tokens: int,
) -> None:
    """After a Ctrl-C: save a checkpoint (unless this step wrote one) and the last adapter, say how
    to resume, and raise."""
    path = p.out / "checkpoints" / f"step-{pos.step:08d}"
    if not _due(pos.step, p.config.checkpoint_every):
        path = _checkpoint(p, pos, trainable, optimizer)
    _save(p, pos, trainable, seconds, tokens, interrupted=True)
    if p.dist.main:
        print(
            f"peftkit: interrupted after step {pos.step} of {p.total_steps}; saved {path} and "
            f"{_last_dir(p)}. Run the same command with --resume to continue from step {pos.step}",
            file=sys.stderr,
            flush=True,
        )
    distributed.shutdown(p.dist)
    raise TrainingInterrupted(pos.step, path)


def _abort_message(p: Prepared) -> str:
    found = list_checkpoints(p.out / "checkpoints")
    if found:
        return f"aborted; --resume continues from the newest checkpoint, {found[-1]}"
    return "aborted before any checkpoint was written: --resume cannot continue this run; start it again with --overwrite"


def _best_dir(p: Prepared) -> Path:
    return p.out / ("adapter-best" if p.is_lora else "model-best")


def _last_dir(p: Prepared) -> Path:
    return p.out / ("adapter-last" if p.is_lora else "model-last")


def _save(
    p: Prepared,
    pos: Position,
    trainable: Trainable,
    seconds: float,
    tokens: int,
    *,
    interrupted: bool = False,
) -> TrainResult:
    """The last adapter (or model), the loss plot and a summary, written by the main process."""
    last, best = _last_dir(p), _best_dir(p)
    has_best = not math.isinf(pos.best_val) and best.is_dir()  # only a best of this run counts
    chosen = best if has_best else last
    metrics_path = p.out / "metrics.jsonl"
    _check_weights(p, pos, trainable)
    final_loss = None
    if p.dist.main:
        p.save_weights(last, pos, trainable)
        plot_losses(
            metrics_path, p.out / "loss.png", f"{p.config.base} on {p.config.data} ({p.config.method})"
        )
        losses = [r["loss"] for r in read_metrics(metrics_path) if "loss" in r]
        final_loss = losses[-1] if losses else None
        if not has_best and not interrupted:
            why = "no validation examples" if not p.val_set else "no validation ran"
            print(f"peftkit: {why}, so there is no {best.name}; the result is {last}", file=sys.stderr)
    summary = {
        "steps": pos.step,
        "epochs": pos.epoch + (pos.batch_in_epoch > 0),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "final_loss": final_loss,
        "best_val_loss": None if math.isinf(pos.best_val) else pos.best_val,
        "output": str(chosen),
        "best_output": str(best) if has_best else None,
        "interrupted": interrupted,
        "precision": p.precision,
        **p.lineage,
        **pos.extra,
    }
    if p.dist.main:
        with atomic_file(p.out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    distributed.barrier(p.dist)
    return TrainResult(
        output_dir=p.out,
        adapter_dir=chosen if p.is_lora else None,
        model_dir=None if p.is_lora else chosen,
        steps=pos.step,
        final_loss=final_loss,
        best_val_loss=summary["best_val_loss"],
        seconds=seconds,
        tokens_per_second=summary["tokens_per_s"] or 0.0,
        summary=summary,
    )


def epoch_batches(data: list[Encoded], config: TrainConfig, world: int, epoch: int) -> list[list[int]]:
    """The global micro-batches of one epoch (indices), fixed by (seed, epoch) so a resumed run
    continues with exactly the batches it would have seen."""
    group = 64 if config.group_by_length else 1
    lengths = [len(e) for e in data]
    return length_grouped_batches(
        lengths, config.batch_size * world, seed=config.seed, epoch=epoch, group_size=group
    )


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
