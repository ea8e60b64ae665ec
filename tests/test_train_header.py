"""The run's header says what a user should know before waiting for the result: the LoRA scale a
changed rank gives, and a training split too small to learn from."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train import make_data

from peftkit.train.config import load_config
from peftkit.train.loop import train


def header(capsys: pytest.CaptureFixture, model: Path, data: Path, out: Path, **values) -> list[str]:
    """The header lines of a one-step run of `values`."""
    base = {"base": str(model), "data": str(data), "output_dir": str(out), "max_steps": 1, "batch_size": 4,
            "precision": "fp32", "progress": False, "tensorboard": False}  # fmt: skip
    capsys.readouterr()
    train(load_config(None, {**base, **values}))
    lines = capsys.readouterr().err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("peftkit train:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    return lines[start:end]


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"lora.r": 8}, "  lora: r=8, lora_alpha=32 (default) -> scale 4.0 (lora_alpha / r)"),
        (
            {"lora.r": 4, "lora.use_rslora": True},
            "  lora: r=4, lora_alpha=32 (default) -> scale 16.0 (lora_alpha / sqrt(r))",
        ),
        ({"lora.lora_alpha": 8}, "  lora: r=16 (default), lora_alpha=8 -> scale 0.5 (lora_alpha / r)"),
    ],
)
def test_the_header_states_the_lora_scale(tiny_model_dir, tmp_path, capsys, values, line):
    lines = header(capsys, tiny_model_dir, make_data(tmp_path / "up.jsonl"), tmp_path / "run", **values)
    assert line in lines, lines


def test_the_header_warns_of_a_training_split_smaller_than_the_validation_split(
    tiny_model_dir, tmp_path, capsys
):
    data = make_data(tmp_path / "up.jsonl", n=24)
    lines = header(capsys, tiny_model_dir, data, tmp_path / "run", val_fraction=0.99)
    (warning,) = [line for line in lines if "WARNING" in line]
    assert warning == (
        "  WARNING: training on only 1 example, fewer than one batch (4) and fewer than the 23 validation "
        "examples (23 held out for validation by val_fraction 0.99); lower val_fraction"
    )
    # Tiny though the validation split is smaller, and named as val_data when it is given.
    lines = header(capsys, tiny_model_dir, make_data(tmp_path / "six.jsonl", n=6), tmp_path / "six",
                   val_data=str(data), batch_size=2)  # fmt: skip
    (warning,) = [line for line in lines if "WARNING" in line]
    assert warning == (
        f"  WARNING: training on only 6 examples, under 8 and fewer than the 24 validation examples (24 held "
        f"out for validation by val_data {data}); give less validation data (val_data)"
    )
    # A split with enough to train on says nothing.
    lines = header(
        capsys,
        tiny_model_dir,
        make_data(tmp_path / "more.jsonl", n=64),
        tmp_path / "more",
        val_fraction=0.125,
    )
    assert not [line for line in lines if "WARNING" in line], lines
