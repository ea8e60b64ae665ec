"""`peftkit demo` wiring, on the tiny saved model (the real run is `make demo`, a few minutes)."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.cli import main


def test_demo_trains_evaluates_and_reports(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    args = [
        "demo",
        "--base",
        str(tiny_model_dir),
        "--steps",
        "3",
        "--n-test",
        "4",
        "--min-score",
        "0",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert summary["n"] == 4 and 0 <= summary["adapter"] <= 1 and summary["task"] == "dates"
    assert f"base {summary['base']:.0%} -> adapter {summary['adapter']:.0%} [ok" in printed
    assert (out / "loss.png").is_file() and (
        Path(summary["adapter_dir"]) / "adapter_model.safetensors"
    ).is_file()
    assert "fresh inputs" in printed and "'the 4th of July, 1976'" in printed


def test_demo_fails_when_the_adapter_misses_the_target(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["demo", "--base", str(tiny_model_dir), "--steps", "1", "--n-test", "2", "--min-score", "1.01"]
    assert main([*args, "--out", str(tmp_path / "demo")]) == 1  # no score reaches 101%
    assert "[FAILED: target 101%]" in capsys.readouterr().out


def test_the_demo_runs_again_into_its_own_directory(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--base", str(tiny_model_dir), "--steps", "2", "--n-test", "2", "--min-score", "0"]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--steps", "3", "--out", str(out)]) == 0  # `make demo` twice: the rerun replaces it
    assert "removed the previous run's files" in capsys.readouterr().err
    assert json.loads((out / "demo.json").read_text())["adapter_dir"] == str(out / "adapter-best")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2, 3]  # the first run's steps are not mixed in
