"""What a run says before its first step: what trains on what, in which precision and why, the data
and the steps, and the warnings a user should read before waiting for the result."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..base.precision import why
from ..methods import METHODS
from .checkpoint import Position
from .setup import Prepared

TINY_TRAINING_SPLIT = 8  # fewer training examples than this and a run learns little worth keeping


def describe(p: Prepared, trainable: Any, pos: Position) -> str:
    """The run's header, one fact a line (printed to stderr by the main process)."""
    c = p.config
    step_examples = c.batch_size * c.grad_accum * p.dist.world
    lines = [
        f"peftkit train: {c.base} on {c.data} ({c.method}, {precision_reason(p)})",
        _data_line(p),
        f"  trainable parameters: {trainable.numel():,}; {p.total_steps} steps ({p.steps_per_epoch} per "
        f"epoch) of {step_examples} examples; output: {p.out}",
        scale_line(p),
        split_warning(p),
    ]
    if not p.val_set:
        kind = "adapter" if p.is_adapter else "model"
        lines.append(f"  no validation examples: there will be no {kind}-best; the result is {kind}-last")
    if pos.step:
        best = "" if math.isinf(pos.best_val) else f"; best validation loss so far {pos.best_val:.4f}"
        lines.append(
            f"  resuming at step {pos.step} (epoch {pos.epoch}, micro-batch {pos.batch_in_epoch}){best}"
        )
    return "\n".join(line for line in lines if line)


def precision_reason(p: Prepared) -> str:
    """ "fp32: this CPU has no native bf16", or "bf16 (precision: bf16)" when the config chose."""
    if p.config.precision != "auto":
        return f"{p.precision} (precision: {p.config.precision})"
    return why(torch.bfloat16 if p.precision == "bf16" else torch.float32, p.dist.device)


def _data_line(p: Prepared) -> str:
    stats = p.lineage["encode_stats"]
    cut = (
        f", {stats['truncated']} truncated, {stats['dropped']} dropped"
        if stats["truncated"] or stats["dropped"]
        else ""
    )
    return (
        f"  data: {len(p.train_set)} train / {len(p.val_set)} validation examples, "
        f"{stats['loss_tokens']} answer tokens of {stats['total_tokens']}{cut}"
    )


def scale_line(p: Prepared) -> str | None:
    """For a method whose update is scaled by alpha over its rank (LoRA: lora_alpha / r; rsLoRA:
    lora_alpha / sqrt(r)), the scale this run trains with, saying which value is the default: a
    changed r alone changes the scale, which acts like a change of learning rate."""
    adapter = p.config.adapter()
    if adapter is None or not all(hasattr(adapter, k) for k in ("scaling", "r", "lora_alpha")):
        return None
    spec = METHODS[p.config.method]
    default = (spec.train_default or spec.config_cls)()
    mark = lambda key: " (default)" if getattr(adapter, key) == getattr(default, key) else ""  # noqa: E731
    rule = "lora_alpha / sqrt(r)" if getattr(adapter, "use_rslora", False) else "lora_alpha / r"
    patterns = [k for k in ("rank_pattern", "alpha_pattern") if getattr(adapter, k, None)]
    others = f"; {' and '.join(patterns)} set other scales on some layers" if patterns else ""
    return (
        f"  {p.config.method}: r={adapter.r}{mark('r')}, lora_alpha={adapter.lora_alpha:g}{mark('lora_alpha')} "
        f"-> scale {round(adapter.scaling(adapter.r, adapter.lora_alpha), 4)} ({rule}){others}"
    )


def split_warning(p: Prepared) -> str | None:
    """A warning when the training split is tiny (under TINY_TRAINING_SPLIT examples, or fewer than
    one optimizer step's batch) or smaller than the validation split, naming what made it so."""
    c = p.config
    n, held_out = len(p.train_set), len(p.val_set)
    batch = c.batch_size * c.grad_accum * p.dist.world
    problems = []
    if n < batch:
        problems.append(f"fewer than one batch ({batch})")
    elif n < TINY_TRAINING_SPLIT:
        problems.append(f"under {TINY_TRAINING_SPLIT}")
    if held_out > n:
        problems.append(f"fewer than the {held_out} validation examples")
    if not problems:
        return None
    source = f"val_data {c.val_data}" if c.val_data else f"val_fraction {c.val_fraction:g}"
    if held_out > n:
        fix = "give less validation data (val_data)" if c.val_data else "lower val_fraction"
    elif c.max_examples is not None and c.max_examples <= n:
        fix = "raise max_examples"
    else:
        fix = "add training data" + (" or lower batch_size" if n < batch else "")
    return (
        f"  WARNING: training on only {n} example{'s' * (n != 1)}, {' and '.join(problems)} "
        f"({held_out} held out for validation by {source}); {fix}"
    )
