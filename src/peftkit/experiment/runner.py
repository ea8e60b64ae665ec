"""One training run in its own process, watched from here: `compare` and `tune` both run through it.

A child process per run gives each run a clean peak-memory figure (its own maximum resident set, read
from the kernel when it exits), keeps one failed run from taking the others down, and lets a watcher
stop a run early (tune's pruning) by reading the metrics the run appends to its metrics.jsonl.

    outcome = run_training(config, workdir / "configs" / "lora.yaml", log=workdir / "logs" / "lora.log")
    outcome.summary["best_val_loss"], outcome.peak_rss_mb
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PeftkitError
from ..io import atomic_file
from ..train.config import TrainConfig, save_config
from .stopping import CHILDREN, stop_signals

POLL_SECONDS = 0.25
# After a stop signal, how long the child may take to checkpoint before it is aborted (a second
# SIGINT), and then before it is killed: a guard against a hung child, far above a checkpoint's time.
STOP_GRACE_SECONDS = 600
TERM_GRACE_SECONDS = 10  # after an error here or a pruning stop, how long the child may take to exit
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunFailed(PeftkitError):
    """A training run's process exited with an error; the message ends with its log's last lines."""


class RunStopped(PeftkitError):
    """A training run's process exited after a stop signal (it saved a checkpoint to resume from)."""


@dataclass
class Outcome:
    output_dir: Path
    summary: dict[str, Any]  # the run's summary.json ({} when it was stopped before it wrote one)
    peak_rss_mb: float | None  # the run's own maximum resident memory, MB = 10^6 bytes (None: not run here)
    stopped: bool  # the watcher stopped it early
    reused: bool  # a finished run with the same config was found and not rerun


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a finished, uninterrupted run of exactly `config` in its output_dir, else None."""
    out = Path(config.output_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
        same = (out / "config.yaml").read_text() == _config_text(config)
    except (OSError, ValueError):
        return None
    return summary if same and not summary.get("interrupted") else None


def run_training(
    config: TrainConfig,
    config_path: Path,
    *,
    log: Path,
    watch: Callable[[dict[str, Any]], bool] | None = None,
    threads: int | None = None,
) -> Outcome:
    """Train `config` in a child process (`peftkit train config_path`), unless that exact run already
    finished (then its summary is reused). An interrupted run of the same config resumes from its
    checkpoint. `watch` sees each new metrics.jsonl record and returns True to stop the run.
    A stop signal (Ctrl-C, SIGTERM, SIGHUP; see .stopping) lets the child checkpoint, then raises its
    KeyboardInterrupt here (main thread) or RunStopped (another thread, whose main thread got it);
    after one, no run starts (NotStarted).
    """
    out = Path(config.output_dir)
    done = finished_summary(config)
    if done is not None:
        return Outcome(out, done, _recorded_peak(out), stopped=False, reused=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(config_path) as tmp:
        tmp.write_text(_config_text(config))
    resume = (out / "config.yaml").is_file() and (out / "config.yaml").read_text() == _config_text(config)
    command = [sys.executable, "-m", "peftkit", "train", str(config_path)]
    command += ["--resume"] if resume and _has_checkpoint(out) else ["--overwrite"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    # A run that starts afresh replaces an old metrics.jsonl: the watcher skips the old file's records.
    metrics = _Tail(out / "metrics.jsonl", skip_current="--overwrite" in command)
    with open(log, "w") as sink, stop_signals() as children:  # (a no-op under compare's or tune's)
        proc = children.popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=_child_setup(os.getpid()))  # fmt: skip
        try:
            status, peak, stopped = _wait(proc, metrics, watch)
        finally:
            children.exited(proc)
        if status != 0 and not stopped and children.requests:  # another thread got the stop signal
            raise RunStopped(f"training {out.name} stopped (exit {status}); rerun to resume it (log: {log})")
    if stopped:  # stopped by the watcher: its summary (if any) is not a finished run's
        return Outcome(out, {}, peak, stopped=True, reused=False)
    if status != 0:
        raise RunFailed(f"training {out.name} failed (exit {status}); its log {log} ends:\n{_tail(log)}")
    (out / "peak_rss_mb.txt").write_text(f"{peak}\n")
    return Outcome(out, _read_summary(out), peak, stopped=False, reused=False)


def _wait(
    proc: subprocess.Popen, metrics: _Tail, watch: Callable[[dict[str, Any]], bool] | None
) -> tuple[int, float, bool]:
    """Wait for the child, feeding `watch` its new metrics; (exit status, peak RSS in MB, stopped).
    A stop signal raised here (the main thread) was already passed on to the child by the handler:
    keep waiting while it checkpoints, then raise the signal's KeyboardInterrupt."""
    stopped, interrupted, clock = False, None, _StopClock()
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # `usage` holds the peak once it exited
            # After the exit too: the last records (the final validation) still reach the watcher.
            # Not once stopping: a pruning SIGTERM would be a second stop request, which aborts.
            watching = watch is not None and not stopped and not CHILDREN.requests
            if watching and any([watch(r) for r in metrics.new_records()]):
                stopped = pid == 0
                if stopped:
                    os.kill(proc.pid, signal.SIGTERM)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if CHILDREN.requests:
                clock.escalate(proc)
            time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP (see .stopping): the child stops too
            interrupted = interrupted or e
        except BaseException:  # an error here: the child goes too
            _terminate(proc)
            raise
    if interrupted is not None:
        raise interrupted
    return proc.returncode, _megabytes(usage.ru_maxrss), stopped


class _StopClock:
    """A child asked to stop that still runs STOP_GRACE_SECONDS later is aborted (a second SIGINT),
    and killed after as long again: only a hung child ever gets there."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.aborted = False

    def escalate(self, proc: subprocess.Popen) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > 2 * STOP_GRACE_SECONDS:
            proc.kill()
        elif now - self.since > STOP_GRACE_SECONDS and not self.aborted:
            os.kill(proc.pid, signal.SIGINT)
            self.aborted = True


def _terminate(proc: subprocess.Popen) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _megabytes(max_rss: int) -> float:
    """ru_maxrss in MB (10^6 bytes): Linux counts KiB, macOS bytes."""
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 1e6


def _child_setup(parent: int) -> Callable[[], None] | None:
    """The child's preexec_fn. SIGINT back to its default, so `peftkit train` takes the stop requests
    passed on to it even when this process was started with SIGINT ignored (a background job). On
    Linux, the kernel sends the child SIGTERM when `parent` dies, however it dies (kill -9 too), so no
    trainer outlives its watcher to race a rerun in the same directory. libc is looked up here, in
    the parent: between fork and exec (compare forks from threads) the child must not import or take
    locks."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        prctl = libc.prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        libc.signal(signal.SIGINT, ctypes.c_void_p(0))  # SIG_DFL
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Tail:
    """The records appended to a JSON-lines file, read as they come; a replaced file is read afresh."""

    def __init__(self, path: Path, skip_current: bool) -> None:
        self.path, self.offset, self.inode = path, 0, None
        self.old = _stamp(path) if skip_current else None  # this file's records are an old run's

    def new_records(self) -> list[dict[str, Any]]:
        stamp = _stamp(self.path)
        if stamp is None or stamp == self.old:
            return []
        self.old = None
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self.inode:  # a new file (or the first one seen)
                    self.inode, self.offset = inode, 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a partly written last line waits for the next poll
        self.offset += end
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _config_text(config: TrainConfig) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_config(config, Path(d) / "c.yaml")
        return (Path(d) / "c.yaml").read_text()


def _has_checkpoint(out: Path) -> bool:
    from ..train.checkpoint import list_checkpoints

    return bool(list_checkpoints(out / "checkpoints"))


def _recorded_peak(out: Path) -> float | None:
    try:
        return float((out / "peak_rss_mb.txt").read_text())
    except (OSError, ValueError):
        return None


def _read_summary(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
