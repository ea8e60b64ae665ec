"""The loss of one batch, the validation loss, and what ends a run early: non-finite values, Ctrl-C."""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batching import collate
from ..data.encode import IGNORE_INDEX
from ..errors import TrainingDivergedError
from . import distributed
from .loss import head_loss_sum, labelled_hidden

if TYPE_CHECKING:
    from .setup import Prepared


def batch_loss(p: Prepared, inputs: dict[str, Tensor]) -> Tensor:
    """Sum of next-token cross-entropies over the batch's labelled tokens."""
    if p.head is not None:
        out = p.backbone(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        h, y = labelled_hidden(out.last_hidden_state, inputs["labels"])  # (N, H), (N,)
        return head_loss_sum(p.head, h, y)
    logits = p.net(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        inputs["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def validation_loss(p: Prepared) -> float:
    """Mean cross-entropy per labelled token over the validation set (all processes together)."""
    d = p.dist
    p.net.eval()
    order = sorted(range(len(p.val_set)), key=lambda i: len(p.val_set[i]))  # little padding
    size = p.config.batch_size * d.world
    total, count = 0.0, 0
    for start in range(0, len(order), size):
        part = [p.val_set[i] for i in order[start : start + size][d.rank :: d.world]]
        if not part:
            continue
        inputs = {k: v.to(d.device) for k, v in collate(part, p.pad_id).items()}
        total += batch_loss(p, inputs).item()
        count += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    p.net.train()
    return distributed.all_sum(total, d) / max(distributed.all_sum(count, d), 1)


def check_finite(value: float, what: str, step: int, lr: float) -> None:
    """Raise TrainingDivergedError when `value` (the step's loss or gradient norm) is NaN or inf."""
    if math.isfinite(value):
        return
    raise TrainingDivergedError(
        f"step {step}: the {what} is {value}; training stopped before the update, and nothing from "
        f"this step was saved. Lower the learning rate (lr is {lr:g}), keep max_grad_norm set, or "
        "check the data and the precision, then start again (--overwrite)"
    )


def weights_are_finite(masters: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(m).all()) for m in masters)


class StopOnCtrlC:
    """Within the block, the first Ctrl-C (SIGINT) only asks the loop to stop after the current step,
    so it can save a checkpoint; a second one aborts at once, as Ctrl-C normally does."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnCtrlC:
        # Signal handlers can only be set from the main thread; an ignored SIGINT stays ignored.
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not print: a signal handler may run in the middle of another print.
        os.write(2, b"\npeftkit: stopping after this step to save a checkpoint (Ctrl-C again aborts)\n")

    def now(self, d: distributed.Dist) -> bool:
        """Whether to stop: the main process decides, so every process stops after the same step."""
        if d.world == 1:
            return self.requested
        return distributed.all_sum(float(self.requested and d.main), d) > 0
