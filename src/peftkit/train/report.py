"""What a run tells its user: a progress bar, a JSONL metrics log, TensorBoard, and a loss plot."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..io import atomic_file


class Reporter:
    """Logs metrics of the main process; silent in the others."""

    def __init__(
        self,
        out: Path,
        *,
        total_steps: int,
        initial_step: int,
        enabled: bool,
        progress: bool,
        tensorboard: bool,
    ) -> None:
        self.enabled = enabled
        self.log_path = out / "metrics.jsonl"
        self.bar = None
        self.writer = None
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, file=sys.stderr
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # A resumed run logs the steps after its checkpoint again: purge_step hides the
                # events from step initial_step + 1 on that the interrupted run had written.
                purge = initial_step + 1 if initial_step else None
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but a trimmed install should still train
                print(
                    "peftkit: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr
                )

    def log(self, record: dict[str, Any]) -> None:
        """Append one record ({"step": ..., metric: value, ...}) to the log and TensorBoard."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("time", "step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def progress(self, steps: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    @contextlib.contextmanager
    def validating(self, examples: int) -> Iterator[Callable[[int], None]]:
        """A bar of its own for one validation pass (on stderr, below the steps' bar, gone when done):
        without it a long validation looks like a run frozen at its step. Yields advance(examples)."""
        if self.bar is None:
            yield lambda n: None
            return
        from tqdm.auto import tqdm

        bar = tqdm(
            total=examples, desc="validating", unit="ex", leave=False, dynamic_ncols=True, file=sys.stderr
        )
        try:
            yield bar.update
        finally:
            bar.close()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar and the TensorBoard writer (once; later messages are printed plainly)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log. A line that is not a JSON object (the torn end of a write that
    a kill interrupted) is skipped: one lost record must not break every later resume."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records up to `step` and drop torn lines, for a run resumed from step `step` (it logs
    the later steps again); return how many lines went."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    if len(kept) < len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return len(lines) - len(kept)


def plot_losses(metrics_path: Path, png: Path, title: str) -> Path | None:
    """Training loss (raw and smoothed) and validation loss against the step, as a PNG."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*train)
    # Bias-corrected moving average of log-loss (the plot is log-scaled): no lag from the first value.
    smooth, avg = [], 0.0
    for t, x in enumerate(losses, start=1):
        avg = 0.9 * avg + 0.1 * math.log(max(x, 1e-12))
        smooth.append(math.exp(avg / (1 - 0.9**t)))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", linewidth=2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
