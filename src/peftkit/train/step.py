"""The loss of one batch, the validation loss, and what ends a run early: non-finite values, and
Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

import peftkit.train.distributed as distributed

from ..data.batching import collate
from ..data.encode import IGNORE_INDEX
from ..errors import TrainingDivergedError
from .checkpoint import list_checkpoints, non_finite
from .loss import head_loss_sum, labelled_hidden
from .optim import Trainable

if TYPE_CHECKING:
    from .setup import Prepared


def batch_loss(p: Prepared, inputs: dict[str, Tensor]) -> Tensor:
    """Sum of next-token cross-entropies over the batch's labelled tokens."""
    if p.head is not None:
        kwargs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "use_cache": False,
        }
        if p.is_adapter:  # the adapted forward's inputs: a soft prompt or prefix acts here too
            kwargs = p.net.adapted_inputs(kwargs)
        out = p.backbone(**kwargs)
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
def validation_loss(p: Prepared, advance: Callable[[int], None] = lambda n: None) -> float:
    """Mean cross-entropy per labelled token over the validation set (all processes together);
    `advance(n)` is told after each global batch of `n` examples (the progress bar)."""
    d = p.dist
    p.net.eval()
    order = sorted(range(len(p.val_set)), key=lambda i: len(p.val_set[i]))  # little padding
    size = p.config.batch_size * d.world
    total, count = 0.0, 0
    for start in range(0, len(order), size):
        batch = order[start : start + size]
        part = [p.val_set[i] for i in batch[d.rank :: d.world]]
        if part:
            inputs = {k: v.to(d.device) for k, v in collate(part, p.pad_id).items()}
            total += batch_loss(p, inputs).item()
            count += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        advance(len(batch))
    p.net.train()
    return distributed.all_sum(total, d) / max(distributed.all_sum(count, d), 1)


def check_finite(p: Prepared, value: float, what: str, step: int, lr: float) -> None:
    """Raise TrainingDivergedError when `value` (step `step`'s loss or gradient norm) is NaN or inf."""
    if not math.isfinite(value):
        raise diverged(
            p,
            f"step {step}: the {what} is {value}; training stopped before the update",
            f"Lower the learning rate (lr is {lr:g}), keep max_grad_norm set, or check the data and the precision",
        )


def check_weights_finite(p: Prepared, step: int, trainable: Trainable) -> None:
    """Never save NaN or inf weights (they can follow from a non-finite gradient without clipping)."""
    if non_finite(dict(zip(trainable.names, trainable.masters))):
        raise diverged(
            p,
            f"step {step}: the trained weights hold NaN or inf",
            f"Lower the learning rate (lr is {p.config.lr:g}) or set max_grad_norm",
        )


def diverged(p: Prepared, problem: str, advice: str) -> TrainingDivergedError:
    """The error for a run that stopped being finite, with what was kept and the way forward.

    Not --resume: the same config repeats the same steps, and lr or max_grad_norm cannot change on
    resume. Not --overwrite in the same output_dir: it would delete the last good checkpoint."""
    found = list_checkpoints(p.out / "checkpoints")
    kept = (
        f"the last good checkpoint, {found[-1]}, is kept" if found else "no checkpoint was written before it"
    )
    return TrainingDivergedError(
        f"{problem}, and nothing from this step was saved; {kept}. {advice}, then start a new run in "
        "another output_dir"
    )


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a run gracefully: Ctrl-C (SIGINT), and SIGTERM and SIGHUP, which
    `timeout`, `docker stop`, Kubernetes, Slurm pre-emption, systemd and a closed terminal send."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return tuple(getattr(signal, n) for n in names if hasattr(signal, n))  # no SIGHUP on Windows


PASSED_ON = getattr(signal, "SIGUSR1", None)
"""The stop request compare and tune pass on to their training runs: it never aborts a run, so when a
signal reaches a run both directly and through its parent (a whole control group's SIGTERM, as systemd
and Slurm send it) the second copy is not taken for an impatient second Ctrl-C."""
ECHO_SECONDS = 2.0
"""After a passed-on stop, a signal within this many seconds is the same request arriving directly."""


class Aborted(KeyboardInterrupt):
    """A second stop signal: the run ends at once, in the middle of whatever it was doing."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by {signal.Signals(signum).name}")
        self.signum = signum


class StopOnSignal:
    """Within the block, the first stop signal (Ctrl-C, SIGTERM or SIGHUP: `stop_signals`) only asks
    the loop to stop after the current step, so it can save a checkpoint and the last weights; a
    second one aborts at once (raises Aborted, a KeyboardInterrupt). A signal that was ignored when
    the block began (SIGHUP under nohup, SIGINT in a background job) stays ignored. SIGUSR1
    (`PASSED_ON`), the stop compare and tune pass on, asks for the same stop but never aborts, and a
    signal within ECHO_SECONDS after it is taken for the same request arriving directly.

    Under torchrun (checked with torch 2.13) each worker runs in a session of its own, so the
    terminal's Ctrl-C, like a SIGTERM to the job, reaches only the launcher, which forwards the signal
    it got to every worker, waits --shutdown_timeout seconds (30 by default;
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and then sends SIGKILL. Every worker sees the request (each prints
    the "stopping" line), the main process decides (`now`), all stop after the same step, the main one
    saves the checkpoint and the last adapter, and the workers exit 128 + the signal's number; the
    launcher itself ends with its own SignalException traceback (exit 1). A step and save longer than
    the timeout are killed, which leaves the previous checkpoint whole (writes are atomic).
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal received
        self._since = 0.0  # when it came (time.monotonic)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        # Signal handlers can only be set from the main thread.
        if threading.current_thread() is threading.main_thread():
            for number in stop_signals():
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._handle)
            if PASSED_ON is not None:
                self._previous[PASSED_ON] = signal.signal(PASSED_ON, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_DFL if previous is None else previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            echo = self.signum == PASSED_ON and time.monotonic() - self._since < ECHO_SECONDS
            if signum == PASSED_ON or echo:
                return  # the stop already asked for, again
            raise Aborted(signum)
        self.signum, self._since = signum, time.monotonic()
        if signum == PASSED_ON:
            said = "the compare/tune run that started this one asks it to stop: stopping after this step to save a checkpoint"
        else:
            again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
            said = f"{signal.Signals(signum).name}: stopping after this step to save a checkpoint ({again} aborts)"
        # os.write, not print: a signal handler may run in the middle of another print.
        os.write(2, f"\npeftkit: {said}\n".encode())

    def now(self, d: distributed.Dist) -> bool:
        """Whether to stop: the main process decides, so every process stops after the same step."""
        if d.world == 1:
            return self.requested
        return distributed.all_sum(float(self.requested and d.main), d) > 0
