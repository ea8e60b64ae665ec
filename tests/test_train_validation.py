"""Validation in a run: every run with validation data ends validated (whatever eval_every says),
with its own progress, and a resumed run keeps the best adapter of the history it continues."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from test_train import adapter_tensors, cli_args, config, make_data
from test_train_signals import HANG_GUARD, start, wait_for_a_step

from peftkit.train.loop import train
from peftkit.train.report import read_metrics


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "up.jsonl")


def validated_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]


def test_a_run_shorter_than_an_epoch_validates_at_its_last_step(tiny_model_dir, data, tmp_path, capsys):
    # 56 training rows in batches of 8: 7 steps an epoch; 3 steps never reach the epoch's end.
    out = tmp_path / "run"
    result = train(config(tiny_model_dir, data, out, max_steps=3, eval_every=0))
    assert validated_steps(out) == [3]
    assert result.adapter_dir == out / "adapter-best" and result.best_val_loss is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_output"] == str(out / "adapter-best") and summary["best_val_loss"] is not None
    assert json.loads((out / "adapter-best" / "training.json").read_text())["step"] == 3
    assert "no adapter-best" not in capsys.readouterr().err


@pytest.mark.parametrize(("eval_every", "validated"), [(2, [2, 4, 5]), (5, [5]), (100, [5])])
def test_the_last_step_is_validated_once(tiny_model_dir, data, tmp_path, eval_every, validated):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=5, eval_every=eval_every))
    assert validated_steps(out) == validated


def test_validation_shows_its_own_progress_unless_progress_is_off(tiny_model_dir, data, tmp_path, capsys):
    # 8 validation examples (val_fraction 0.125 of 64 rows); a bar of their own, not the steps' bar.
    train(config(tiny_model_dir, data, tmp_path / "on", max_steps=2, progress=True))
    err = capsys.readouterr().err
    assert "validating" in err and "/8 [" in err, err
    train(config(tiny_model_dir, data, tmp_path / "off", max_steps=2, progress=False))
    err = capsys.readouterr().err
    assert "validating" not in err and "step 2: validation loss" in err


# -- a resumed run keeps the best of the history it continues -----------------------------------------
RESUME_FROM = """
import json, sys
from peftkit.train.config import load_config
from peftkit.train.loop import train
train(load_config(None, json.loads(sys.argv[1])), resume=sys.argv[2])
"""


def val_loss_at(out: Path, step: int) -> float:
    (loss,) = [
        r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r["step"] == step and "val_loss" in r
    ]
    return loss


def test_a_resumed_run_keeps_the_best_adapter_of_the_history_it_continues(tiny_model_dir, data, tmp_path):
    """Issue 18's scenario: validated at 12 (adapter-best), a checkpoint at 13, validated at 24 (a
    better adapter-best), then resumed from the step-13 checkpoint and stopped by SIGTERM before it
    validates again: its best is step 12's, on disk and in the summary alike; resumed once more with
    a smaller max_steps, it says so and ends with files and summary that agree."""
    common = {"schedule": "constant", "warmup_ratio": 0.0, "eval_every": 12, "checkpoint_every": 13}
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=30, keep_checkpoints=5, **common))
    assert validated_steps(out) == [12, 24, 30]
    best_step = json.loads((out / "adapter-best" / "training.json").read_text())["step"]
    assert best_step > 13, "the scenario needs a best adapter written after the step-13 checkpoint"
    val_12 = val_loss_at(out, 12)
    # The weights at step 12 (a constant learning rate: the same steps whatever max_steps is).
    reference = train(config(tiny_model_dir, data, tmp_path / "ref", max_steps=12, **common))

    # Resumed from step 13 in a process of its own, long enough to be stopped before it validates.
    resumed = config(tiny_model_dir, data, out, max_steps=300, **{**common, "eval_every": 1000})
    command = [sys.executable, "-c", RESUME_FROM, json.dumps(resumed.to_dict())]
    proc = start([*command, str(out / "checkpoints" / "step-00000013")])
    wait_for_a_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert "max_steps was 30, now 300" in err, err
    stopped_at = json.loads((out / "summary.json").read_text())["steps"]
    assert 13 < stopped_at < 300 and validated_steps(out) == [12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] == val_12 and summary["best_output"] == str(out / "adapter-best")
    assert json.loads((out / "adapter-best" / "training.json").read_text())["step"] == 12
    a, b = adapter_tensors(reference.output_dir / "adapter-last"), adapter_tensors(out / "adapter-best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Resumed again (from the newest checkpoint) with a smaller max_steps: said out loud, and the end
    # agrees with the files: a validation at the last step, and adapter-best the better of the two.
    end = stopped_at + 2
    args = cli_args(tiny_model_dir, data, out, max_steps=end, **common)
    again = start([sys.executable, "-m", "peftkit", "train", *args, "--resume"])
    _, err = again.communicate(timeout=HANG_GUARD)
    assert again.returncode == 0, err
    assert "max_steps was 300, now " + str(end) in err and "no adapter-best" not in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, end + 1))
    assert validated_steps(out) == [12, end]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] == min(val_12, val_loss_at(out, end))
    assert summary["best_output"] == str(out / "adapter-best")
    saved_at = json.loads((out / "adapter-best" / "training.json").read_text())["step"]
    assert saved_at == (12 if summary["best_val_loss"] == val_12 else end)


def test_a_checkpoint_without_its_best_starts_the_choice_of_the_best_afresh(
    tiny_model_dir, data, tmp_path, capsys
):
    # A checkpoint as written before checkpoints kept the best adapter: no best/ inside.
    common = {"schedule": "constant", "warmup_ratio": 0.0, "eval_every": 4, "checkpoint_every": 5}
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=8, **common))
    checkpoint = out / "checkpoints" / "step-00000005"
    assert json.loads((checkpoint / "best" / "training.json").read_text())["step"] == 4
    shutil.rmtree(checkpoint / "best")
    capsys.readouterr()
    result = train(config(tiny_model_dir, data, out, max_steps=6, **common), resume=checkpoint)
    err = capsys.readouterr().err
    assert "holds no copy of the best adapter-best" in err and "chooses its best afresh" in err
    assert result.best_val_loss == val_loss_at(out, 6) and validated_steps(out) == [4, 6]
    assert json.loads((out / "adapter-best" / "training.json").read_text())["step"] == 6
