"""SIGTERM and SIGHUP stop `peftkit train` as Ctrl-C does: after the current step, with a checkpoint,
adapter-last and the way to resume, exiting 128 + the signal's number; a second signal aborts at once.
Real processes and real signals; each is sent once the run has written what shows it is training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import make_data

from peftkit.train.report import read_metrics

HANG_GUARD = 600  # seconds: only a hung run takes this long, on any machine, however loaded


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "up.jsonl")


def train_command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # 300 steps and no validation until the last: a signal sent after the first step lands mid-run.
    args = [
        "--base", str(model), "--data", str(data), "--max_steps", "300", "--batch_size", "8",
        "--lr", "0.01", "--precision", "fp32", "--progress", "false", "--tensorboard", "false",
        "--lora.r", "4", "--eval_every", "1000", "--seed", "3", "--output_dir", str(out),
    ]  # fmt: skip
    return [sys.executable, "-m", "peftkit", "train", *args, *extra]


def start(command: list[str]) -> subprocess.Popen:
    """The run in a process of its own, with SIGINT, SIGTERM and SIGHUP at their defaults (a CI
    runner's background job may start with some ignored, and that is inherited across exec)."""

    def defaults() -> None:
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = math.floor(time.time() * 1000) / 1000  # metrics.jsonl's times are rounded to the ms
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=defaults
    )
    proc.started = started
    return proc


def wait_for_a_step(proc: subprocess.Popen, out: Path) -> None:
    """Until the run `proc` has logged a training step (so its handlers are in place); records an
    earlier run left in the file do not count."""
    deadline = time.monotonic() + HANG_GUARD
    while not any("loss" in r and r["time"] >= proc.started for r in read_metrics(out / "metrics.jsonl")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run logged no step"
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_sigterm_and_sighup_save_a_checkpoint_and_exit_128_plus_the_signal(
    tiny_model_dir, data, tmp_path, signum
):
    out = tmp_path / "run"
    proc = start(train_command(tiny_model_dir, data, out))
    wait_for_a_step(proc, out)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + signum, err
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 300
    assert f"{signum.name}: stopping after this step to save a checkpoint" in err
    assert f"stopped by {signum.name} after step {step} of 300" in err
    assert f"--resume (resume=True in Python) to continue from step {step}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == step
    assert json.loads((out / "adapter-last" / "training.json").read_text())["step"] == step


def test_a_second_signal_aborts_at_once(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    proc = start(train_command(tiny_model_dir, data, out))
    wait_for_a_step(proc, out)
    # Both signals reach the run while it is frozen mid-run, so it handles them back to back: the
    # first asks for a stop after the step, the second aborts before the step ends.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode in (128 + signal.SIGHUP, 128 + signal.SIGTERM), err
    assert "aborted before any checkpoint was written" in err
    assert not (out / "checkpoints").exists() and not (out / "adapter-last").exists()


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGUSR1, signal.SIGTERM), (signal.SIGHUP, signal.SIGUSR1)],
    ids=["passed-on-then-direct", "direct-then-passed-on"],
)
def test_a_stop_passed_on_by_compare_and_the_same_signal_sent_directly_are_one_request(
    tiny_model_dir, data, tmp_path, first, second
):
    """A control group's SIGTERM (systemd, Slurm) reaches a compare/tune run directly and, passed on
    by its parent, as SIGUSR1: the run stops once, with its checkpoint, instead of aborting."""
    out = tmp_path / "run"
    proc = start(train_command(tiny_model_dir, data, out))
    wait_for_a_step(proc, out)
    proc.send_signal(signal.SIGSTOP)  # both arrive at once (the kernel delivers the lower number first)
    proc.send_signal(first)
    proc.send_signal(second)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + first, err
    assert "aborted" not in err
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = int(checkpoint.name.split("-")[1])
    assert json.loads((out / "adapter-last" / "training.json").read_text())["step"] == step
