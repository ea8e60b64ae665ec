"""Validation in a run: every run with validation data ends validated (whatever eval_every says),
with its own progress, and a resumed run keeps the best adapter of the history it continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import config, make_data

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
