"""Training every variant of a comparison, each in its own process (`peftkit.experiment.run_training`),
`jobs` at a time; a variant whose run already finished with the same config is reused, not retrained.

    OUT/configs/NAME.yaml   the variant's resolved training config
    OUT/runs/NAME/          its run directory (adapter-best/ or model-best/, summary.json, ...)
    OUT/logs/NAME.log       the child process's output
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..experiment import Experiment, Outcome, RunFailed, Variant, run_training
from ..experiment.runner import finished_summary
from ..experiment.stopping import CHILDREN, NotStarted, signal_name
from ..train.config import FULL, TrainConfig


@dataclass
class Trained:
    """A variant's finished training run."""

    variant: Variant
    config: TrainConfig
    outcome: Outcome
    log: Path

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def is_full(self) -> bool:
        return self.config.method == FULL

    @property
    def weights_dir(self) -> Path:
        """The adapter (or, for full fine-tuning, model) directory the run chose: best, else last."""
        chosen = Path(str(self.outcome.summary.get("output", "")))
        return self.outcome.output_dir / chosen.name

    def size_mb(self) -> float:
        """The adapter's (or full model's) files on disk, in MB (10^6 bytes)."""
        return sum(f.stat().st_size for f in self.weights_dir.rglob("*") if f.is_file()) / 1e6


def variant_configs(experiment: Experiment, out: Path) -> dict[str, TrainConfig]:
    """Each variant's training config, its run directory under OUT/runs (absolute, so a rerun from
    another working directory still finds and reuses the run)."""
    runs = out.resolve() / "runs"
    return {
        v.name: experiment.config(
            v.overrides, output_dir=str(runs / v.name), progress=False, tensorboard=False
        )
        for v in experiment.variants
    }


def threads_per_run(jobs: int) -> int:
    """cores // jobs (at least 1), no more than OMP_NUM_THREADS when that is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // jobs)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def train_variants(
    experiment: Experiment, configs: dict[str, TrainConfig], out: Path, *, jobs: int, say: Any = print
) -> list[Trained]:
    """Train (or reuse) every variant, `jobs` at a time, printing a line as each starts and ends.
    When any fails, the others still finish; then RunFailed names every failed variant and its log.
    A stop signal (Ctrl-C, SIGTERM, SIGHUP: see peftkit.experiment.stopping) starts nothing more: the
    running children save a checkpoint, then the signal's KeyboardInterrupt is raised once they
    exited, after saying how to resume."""
    threads = threads_per_run(jobs)
    total = len(experiment.variants)
    lock = threading.Lock()

    def one(i: int, v: Variant) -> Trained | None:
        config, log = configs[v.name], out / "logs" / f"{v.name}.log"
        tag = f"[{i}/{total}] {v.name}"
        with lock:
            if CHILDREN.requests:  # stopped: a run that has not started yet never starts
                return None
            if finished_summary(config) is None:  # else run_training reuses it, and says nothing starts
                say(f"{tag}: training {config.method}{_quantized(config)} (log: {log})")
        t0 = time.perf_counter()
        try:
            outcome = run_training(config, out / "configs" / f"{v.name}.yaml", log=log, threads=threads)
        except NotStarted:  # the stop came between the check above and the start
            return None
        with lock:
            say(f"{tag}: {_finished(outcome, time.perf_counter() - t0)}")
        return Trained(v, config, outcome, log)

    say(f"training {total} variants, {jobs} at a time ({threads} threads each); logs in {out / 'logs'}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, i, v) for i, v in enumerate(experiment.variants, start=1)]
        try:
            done = [_result(f) for f in futures]
        except KeyboardInterrupt as e:  # the handler already asked the running children to stop
            pool.shutdown(wait=False, cancel_futures=True)  # the queued runs never start
            say(_interrupted(futures, e))
            raise
    failed = [(v.name, e) for v, e in zip(experiment.variants, done, strict=True) if isinstance(e, RunFailed)]
    if failed:
        first = failed[0][1]
        names = ", ".join(n for n, _ in failed)
        logs = ", ".join(str(out / "logs" / f"{n}.log") for n, _ in failed)
        raise RunFailed(f"{len(failed)} of {total} variants failed to train ({names}); see {logs}. "
                        f"The finished ones are kept: run compare again to retry.\n{first}")  # fmt: skip
    return [t for t in done if isinstance(t, Trained)]


def _result(future: Future) -> Trained | RunFailed | None:
    try:
        return future.result()
    except RunFailed as e:
        return e


def _interrupted(futures: list[Future], e: KeyboardInterrupt) -> str:
    """After a stop signal: wait for the running runs (their children were asked to stop and save a
    checkpoint; a second signal aborts them), then say what was left and how to go on."""
    running = [f for f in futures if not f.cancelled()]  # wait() never returns for a cancelled one
    while True:
        try:
            wait(running)
            break
        except KeyboardInterrupt:  # another signal: passed on to the children too; keep waiting
            continue
    finished = stopped = 0
    for f in running:
        if f.exception() is None and f.result() is not None:
            finished += 1
        elif f.exception() is not None:
            stopped += 1
    left = len(futures) - finished - stopped
    how = "interrupted" if signal_name(e) == "SIGINT" else f"stopped by {signal_name(e)}"
    return (f"{how}: {finished} variant(s) finished, {stopped} stopped (each resumes from its last "
            f"checkpoint), {left} not started. Run the same command again to go on: finished runs are "
            "reused, stopped ones resume.")  # fmt: skip


def _quantized(config: TrainConfig) -> str:
    return f" over a {config.quantize} base" if config.quantize else ""


def _finished(outcome: Outcome, wall: float) -> str:
    s = outcome.summary
    if outcome.reused:
        return f"reused the finished run in {outcome.output_dir} (trained in {s.get('seconds', 0):.1f} s)"
    rate = s.get("tokens_per_s") or 0
    return f"trained in {wall:.0f} s ({s.get('steps')} steps, {rate:.0f} tokens/s)"


def require_variants(experiment: Experiment) -> None:
    if not experiment.variants:
        raise ConfigError("the experiment has no variants: add a `variants:` list (see docs/compare.md)")
