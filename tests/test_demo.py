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
    printed, err = capsys.readouterr()
    # A 3-step run validates on as many examples as it trained on (24), not on 100.
    assert "1976 train / 24 validation examples" in err, err
    summary = json.loads((out / "demo.json").read_text())
    assert summary["n"] == 4 and 0 <= summary["adapter"] <= 1 and summary["task"] == "dates"
    assert f"base {summary['base']:.0%} -> adapter {summary['adapter']:.0%} [ok" in printed
    assert (out / "loss.png").is_file() and (
        Path(summary["adapter_dir"]) / "adapter_model.safetensors"
    ).is_file()
    assert "fresh inputs" in printed and "'the 4th of July, 1976'" in printed


def test_demo_fails_when_the_adapter_misses_the_target(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["demo", "--base", str(tiny_model_dir), "--steps", "1", "--n-test", "2", "--min-score", "1"]
    assert main([*args, "--out", str(tmp_path / "demo")]) == 1  # one step of a random model: not 100%
    assert "[FAILED: target 100%]" in capsys.readouterr().out


def test_the_demos_numbers_are_checked_by_their_own_names(tmp_path: Path, capsys) -> None:
    """`--steps -3` named eval_every, a key the user never typed; `--n-test 0` printed nan%;
    `--min-score 2` was accepted. Each is refused before anything loads or is written."""
    out = tmp_path / "demo"
    for option, value, message in [
        ("--steps", "-3", "--steps must be at least 1, got -3"),
        ("--n-test", "0", "--n-test must be at least 1"),
        ("--min-score", "2", "--min-score is a score between 0 and 1"),
        ("--min-score", "-0.5", "--min-score is a score between 0 and 1"),
    ]:
        assert main(["demo", option, value, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: {message}" in err and "eval_every" not in err, err
        assert not out.exists()


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


def test_the_demo_refuses_an_out_that_holds_another_run(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from test_run_dirs import snapshot
    from test_train import config, make_data

    from peftkit.train.loop import train

    real = tmp_path / "my-real-run"
    train(config(tiny_model_dir, make_data(tmp_path / "up.jsonl"), real, max_steps=2))
    before = snapshot(real)
    args = ["demo", "--base", str(tiny_model_dir), "--steps", "1", "--n-test", "2", "--min-score", "0"]
    assert main([*args, "--out", str(real)]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {real} is not empty and holds no earlier demo run" in err
    assert "choose a new or empty --out" in err and "--output_dir" not in err
    assert snapshot(real) == before  # the real run is untouched
    # The train checks come before the demo marks its directory: nothing lands inside the base model.
    base_before = snapshot(tiny_model_dir)
    assert main([*args, "--out", str(tiny_model_dir / "demo")]) == 2
    assert "is inside the base model directory" in capsys.readouterr().err
    assert snapshot(tiny_model_dir) == base_before
    # An interrupted demo (its demo.json has no scores yet) is still the demo's to replace.
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text('{"task": "dates", "status": "training"}')
    (demo / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (demo / "config.yaml").write_bytes((real / "config.yaml").read_bytes())
    assert main([*args, "--out", str(demo)]) == 0
    assert json.loads((demo / "demo.json").read_text())["n"] == 2


def test_an_interrupted_demo_says_the_demos_way_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The demo has no --resume: stopped mid-run, it says to run the same command again (which starts
    it over), not train's `--resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    command = [sys.executable, "-m", "peftkit", "demo", "--base", str(tiny_model_dir), "--steps", "100000",
               "--n-test", "1", "--min-score", "0", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    guard = time.monotonic() + 600  # a hang guard only
    while not (out / "metrics.jsonl").is_file() or '"loss"' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < guard, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Run the same `peftkit demo` command again" in err and "--resume" not in err, err
