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
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import peftkit.train.distributed as distributed

from ..data.batching import collate, length_grouped_batches
from ..data.encode import Encoded
from ..io import atomic_file
from ..terminal import printable
from .checkpoint import Position
from .config import TrainConfig, save_config
from .header import describe
from .optim import Trainable, lr_at, make_optimizer, set_lr
from .report import Reporter, plot_losses, read_metrics
from .resume import abort_message, raise_interrupted, resume_from, starting_point, write_checkpoint
from .run_dir import claim, run_dir
from .setup import Prepared, prepare
from .step import StopOnSignal, batch_loss, check_finite, check_weights_finite, validation_loss


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
    rerun: str | None = None,
) -> TrainResult:
    """Fine-tune `config.base` on `config.data`.

    The output directory must not hold another run (checked before the model loads): `resume`
    continues it from its newest checkpoint (True) or from a given checkpoint directory;
    `overwrite` deletes the old run's files (only those) first. A checkpoint trained on other data
    or another base model is refused unless `allow_changed_inputs`, which says so loudly and records
    the change in the adapter's training.json. Ctrl-C, SIGTERM or SIGHUP stops after the current
    step, saves a checkpoint and the last adapter, and raises TrainingInterrupted (a
    KeyboardInterrupt, with the signal's number); a second signal aborts at once. `rerun` replaces
    the advice then given (resume with --resume) for a caller with its own way to go on (the demo).
    """
    start = starting_point(config, run_dir(config), resume=resume, overwrite=overwrite)
    d = distributed.init()
    distributed.barrier(d)  # every process has checked the directory before the main one changes it
    p = prepare(config, d)
    if d.main:  # only now: a run that fails to start leaves its directory as it was
        claim(p.out, overwrite=overwrite, resume=start is not None)
    distributed.barrier(d)
    trainable = Trainable.of(p.net)
    optimizer = make_optimizer(trainable, config)
    pos = resume_from(p, trainable, optimizer, *start, allow_changed_inputs) if start else Position()
    if d.main:
        print(printable(describe(p, trainable, pos), keep="\n"), file=sys.stderr, flush=True)
        save_config(config, p.out / "config.yaml")
    reporter = Reporter(
        p.out,
        total_steps=p.total_steps,
        initial_step=pos.step,
        enabled=d.main,
        progress=config.progress,
        tensorboard=config.tensorboard,
    )
    started = time.perf_counter()
    try:
        # The final save is inside the block too: a stop signal during it lets it finish.
        with StopOnSignal() as stop:
            pos, tokens, stopped = _fit(p, trainable, optimizer, pos, reporter, stop)
            reporter.close()
            # A stopped run's checkpoint is written (by _fit); this saves its last weights too.
            result = _save(p, pos, trainable, time.perf_counter() - started, tokens, interrupted=stopped)
    except KeyboardInterrupt:  # a second stop signal, or Ctrl-C outside the main thread
        reporter.message(f"aborted; {rerun}" if rerun else abort_message(p))
        raise
    finally:
        reporter.close()
    if stopped:  # say how to resume
        raise_interrupted(p, pos, stop.signum or signal.SIGINT, rerun)
    distributed.shutdown(d)
    return result


def _fit(
    p: Prepared,
    trainable: Trainable,
    optimizer: torch.optim.Optimizer,
    pos: Position,
    reporter: Reporter,
    stop: StopOnSignal,
) -> tuple[Position, int, bool]:
    """Optimizer steps until max_steps, the last epoch, early stopping or a stop signal. Returns the
    final position, the number of (padded) tokens processed, and whether a signal stopped the run."""
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
            if _validation_due(p, pos, len(batches)) and _validate(p, pos, trainable, reporter):
                return pos, tokens_seen, False  # early stopping
            # A stop signal is heeded only once the step's validation is done, and its checkpoint holds
            # everything, so that resuming gives exactly the run that was not interrupted.
            stopping = stop.now(d) and pos.step < p.total_steps
            if stopping or _due(pos.step, c.checkpoint_every):
                write_checkpoint(p, pos, trainable, optimizer)
            if stopping:
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
    check_finite(p, loss, "training loss", index + 1, lr)
    distributed.all_sum_grads(trainable.params, p.dist)
    trainable.grads_to_masters()
    if p.config.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(trainable.masters, p.config.max_grad_norm)
        check_finite(p, float(norm), "gradient norm", index + 1, lr)
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
    with reporter.validating(len(p.val_set)) as advance:
        val = validation_loss(p, advance)
    reporter.log({"step": pos.step, "val_loss": val})
    reporter.message(f"step {pos.step}: validation loss {val:.4f}")
    if val < pos.best_val:
        pos.best_val, pos.bad_evals = val, 0
        check_weights_finite(p, pos.step, trainable)
        if p.dist.main:
            p.save_weights(p.best_dir, pos, trainable)
    else:
        pos.bad_evals += 1
    patience = p.config.early_stopping_patience
    if patience and pos.bad_evals >= patience:
        reporter.message(f"early stopping: no better validation loss in {patience} validations")
        return True
    return False


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
    last, best = p.last_dir, p.best_dir
    has_best = not math.isinf(pos.best_val) and best.is_dir()  # only a best of this run counts
    chosen = best if has_best else last
    metrics_path = p.out / "metrics.jsonl"
    check_weights_finite(p, pos.step, trainable)
    final_loss = None
    if p.dist.main:
        p.save_weights(last, pos, trainable)
        plot_losses(
            metrics_path, p.out / "loss.png", f"{p.config.base} on {p.config.data} ({p.config.method})"
        )
        losses = [r["loss"] for r in read_metrics(metrics_path) if "loss" in r]
        final_loss = losses[-1] if losses else None
        if not has_best and not interrupted:
            print(f"peftkit: {_no_best(p, pos)}; the result is {last}", file=sys.stderr)
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
        "method": p.config.method,
        "quantize": p.config.quantize,
        "trainable_parameters": trainable.numel(),
        **p.lineage,
        **pos.extra,
    }
    if p.dist.main:
        with atomic_file(p.out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    distributed.barrier(p.dist)
    return TrainResult(
        output_dir=p.out,
        adapter_dir=chosen if p.is_adapter else None,
        model_dir=None if p.is_adapter else chosen,
        steps=pos.step,
        final_loss=final_loss,
        best_val_loss=summary["best_val_loss"],
        seconds=seconds,
        tokens_per_second=summary["tokens_per_s"] or 0.0,
        summary=summary,
    )


def _no_best(p: Prepared, pos: Position) -> str:
    """Why a finished run has no best adapter, in words that agree with its files and summary."""
    name = p.best_dir.name
    if not p.val_set:
        return f"no validation examples, so there is no {name}"
    if math.isinf(pos.best_val):
        return f"no validation ran, so there is no {name}"
    return f"{name} (validation loss {pos.best_val:.4f}) is missing from {p.out}"


def epoch_batches(data: list[Encoded], config: TrainConfig, world: int, epoch: int) -> list[list[int]]:
    """The global micro-batches of one epoch (indices), fixed by (seed, epoch) so a resumed run
    continues with exactly the batches it would have seen."""
    group = 64 if config.group_by_length else 1
    lengths = [len(e) for e in data]
    return length_grouped_batches(
        lengths, config.batch_size * world, seed=config.seed, epoch=epoch, group_size=group
    )


def _validation_due(p: Prepared, pos: Position, batches_per_epoch: int) -> bool:
    """Whether to validate after step `pos.step`: every eval_every steps (0: at each epoch's end), and
    always at the last step, so a run with validation data ends with a validation loss and a best
    adapter even when max_steps stops it before eval_every or the epoch's end comes."""
    every = p.config.eval_every
    end_of_epoch = pos.batch_in_epoch >= batches_per_epoch
    return _due(pos.step, every) or (every == 0 and end_of_epoch) or pos.step == p.total_steps


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
