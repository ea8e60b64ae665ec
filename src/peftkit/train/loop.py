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
from . import distributed
from .checkpoint import Position, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig, save_config
from .optim import Trainable, lr_at, make_optimizer, set_lr
from .report import Reporter, plot_losses
from .setup import Prepared, prepare
from .step import batch_loss, validation_loss


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


def train(config: TrainConfig, *, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune `config.base` on `config.data`; `resume` continues from the newest checkpoint of
    the run's output directory (True) or from a given checkpoint directory."""
    d = distributed.init()
    p = prepare(config, d)
    trainable = Trainable.of(p.net)
    optimizer = make_optimizer(trainable, config)
    pos = Position()
    if resume:
        pos = _resume(p, trainable, optimizer, resume)
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
        pos, tokens = _fit(p, trainable, optimizer, pos, reporter)
    except KeyboardInterrupt:
        reporter.message("interrupted; the newest checkpoint (if any) can be resumed with --resume")
        raise
    finally:
        reporter.close()
    seconds = time.perf_counter() - started
    result = _save(p, pos, trainable, seconds, tokens)
    distributed.shutdown(d)
    return result


def _fit(
    p: Prepared, trainable: Trainable, optimizer: torch.optim.Optimizer, pos: Position, reporter: Reporter
) -> tuple[Position, int]:
    """Optimizer steps until max_steps, the last epoch, or early stopping. Returns the final position
    and the number of (padded) tokens processed."""
    c, d = p.config, p.dist
    tokens_seen = 0
    while pos.step < p.total_steps:
        batches = epoch_batches(p.train_set, c, d.world, pos.epoch)
        while pos.batch_in_epoch < len(batches) and pos.step < p.total_steps:
            window = batches[pos.batch_in_epoch : pos.batch_in_epoch + c.grad_accum]
            t0 = time.perf_counter()
            loss, padded, real = _step(p, trainable, optimizer, window, lr_at(pos.step, p.total_steps, c))
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
                return pos, tokens_seen  # early stopping
            if _due(pos.step, c.checkpoint_every) and d.main:
                _checkpoint(p, pos, trainable, optimizer)
        if pos.batch_in_epoch >= len(batches):
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
    return pos, tokens_seen


def _step(
    p: Prepared, trainable: Trainable, optimizer: torch.optim.Optimizer, window: list[list[int]], lr: float
) -> tuple[float, int, int]:
    """One optimizer step over `window` (global micro-batches). Returns (mean loss over the global
    batch, padded tokens this process ran, labelled tokens of the global batch)."""
    loss_sum, padded, labelled = accumulate(p, window)
    distributed.all_sum_grads(trainable.params, p.dist)
    trainable.grads_to_masters()
    if p.config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainable.masters, p.config.max_grad_norm)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainable.masters_to_params()
    return distributed.all_sum(loss_sum, p.dist) / max(labelled, 1), padded, labelled


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
        if p.dist.main:
            p.save_weights(p.out / ("adapter-best" if p.is_lora else "model-best"), pos, trainable)
    else:
        pos.bad_evals += 1
    patience = p.config.early_stopping_patience
    if patience and pos.bad_evals >= patience:
        reporter.message(f"early stopping: no better validation loss in {patience} validations")
        return True
    return False


def _checkpoint(p: Prepared, pos: Position, trainable: Trainable, optimizer: torch.optim.Optimizer) -> Path:
    return save_checkpoint(
        p.out / "checkpoints", pos, trainable.names, trainable.masters, optimizer, p.config.to_dict(),
        keep=p.config.keep_checkpoints,
    )  # fmt: skip


def _resume(
    p: Prepared, trainable: Trainable, optimizer: torch.optim.Optimizer, resume: bool | str | Path
) -> Position:
    if resume is True:
        found = list_checkpoints(p.out / "checkpoints")
        if not found:
            raise FileNotFoundError(
                2, "no checkpoint to resume from (checkpoint_every must be > 0)", str(p.out / "checkpoints")
            )
        path = found[-1]
    else:
        path = Path(resume)
    pos = load_checkpoint(path, trainable.names, trainable.masters, optimizer, p.config.to_dict())
    trainable.masters_to_params()
    if p.dist.main:
        print(f"peftkit: resuming from {path} (step {pos.step})", flush=True)
    return pos


def _save(p: Prepared, pos: Position, trainable: Trainable, seconds: float, tokens: int) -> TrainResult:
    """The last adapter (or model), the loss plot and a summary, written by the main process."""
    last = p.out / ("adapter-last" if p.is_lora else "model-last")
    best = p.out / ("adapter-best" if p.is_lora else "model-best")
    metrics_path = p.out / "metrics.jsonl"
    final_loss = None
    if p.dist.main:
        p.save_weights(last, pos, trainable)
        plot_losses(
            metrics_path, p.out / "loss.png", f"{p.config.base} on {p.config.data} ({p.config.method})"
        )
        losses = [
            json.loads(line)["loss"] for line in metrics_path.read_text().splitlines() if '"loss"' in line
        ]
        final_loss = losses[-1] if losses else None
    chosen = best if best.is_dir() else last
    summary = {
        "steps": pos.step,
        "epochs": pos.epoch + (pos.batch_in_epoch > 0),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "final_loss": final_loss,
        "best_val_loss": None if math.isinf(pos.best_val) else pos.best_val,
        "output": str(chosen),
        "precision": p.precision,
        **p.lineage,
    }
    if p.dist.main:
        (p.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
