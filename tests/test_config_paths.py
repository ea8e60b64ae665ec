"""Paths in a config file (and an experiment file) are relative to the file's folder, as in compose
files; on the command line, to the working directory; output_dir always to the working directory.
The saved config records absolute paths, so it reruns from anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_train import config, make_data

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.experiment import read_experiment
from peftkit.train.config import load_config
from peftkit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_a_shipped_config_trains_from_another_working_directory(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["train", str(ROOT / "examples" / "support_chat.yaml"), "--base", str(tiny_model_dir),
            "--max_steps", "1", "--precision", "fp32", "--progress", "false", "--tensorboard", "false"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    run = elsewhere / "runs" / "support-chat"  # output_dir: relative to the working directory
    saved = load_config(run / "config.yaml")
    assert saved.data == str(ROOT / "examples" / "data" / "support.jsonl")
    # The saved config reruns from yet another directory.
    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.chdir(third)
    assert main(["train", str(run / "config.yaml"), "--output_dir", "again"]) == 0
    assert json.loads((third / "again" / "summary.json").read_text())["steps"] == 1


def test_which_values_are_paths_and_against_what(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "tiny").symlink_to(tiny_model_dir)
    make_data(folder / "rows.jsonl")
    (folder / "c.yaml").write_text(
        "data: rows.jsonl\nval_data: task:dates\nbase: models/tiny\noutput_dir: runs/x\n"
    )
    monkeypatch.chdir(tmp_path)
    c = load_config(Path("configs/c.yaml"))
    assert (c.data, c.val_data) == (str(folder / "rows.jsonl"), "task:dates")
    assert c.base == str(folder / "models" / "tiny") and c.output_dir == "runs/x"
    # Built-in names and hub ids are not paths; a command-line value is the shell's, as typed.
    for base in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M"):
        (folder / "c.yaml").write_text(f"base: {base}\ndata: rows.jsonl\n")
        assert load_config(folder / "c.yaml").base == base
    assert load_config(folder / "c.yaml", {"data": "mine.jsonl"}).data == "mine.jsonl"
    # A .gguf file or a ./path beside the file is a path even when it does not exist (the load names it).
    (folder / "c.yaml").write_text("base: ./missing.gguf\n")
    assert load_config(folder / "c.yaml").base == str(folder / "missing.gguf")


def test_a_path_written_for_the_working_directory_gets_a_hint(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    make_data(folder / "rows.jsonl")
    (folder / "c.yaml").write_text("data: configs/rows.jsonl\n")  # relative to tmp_path, the old rule
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(folder / "c.yaml")
    assert "paths in a config file are relative to its folder" in str(e.value)
    assert "write 'rows.jsonl' or an absolute path" in str(e.value)


def test_an_experiment_file_resolves_its_paths_the_same_way(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    folder.mkdir()
    for name in ("rows.jsonl", "other.jsonl", "test.jsonl"):
        make_data(folder / name)
    (folder / "text.txt").write_text("Some general text.\n")
    (folder / "e.yaml").write_text(
        f"base: {tiny_model_dir}\ndata: rows.jsonl\nmax_steps: 1\n"
        "variants: [{name: a}, {name: b, data: other.jsonl}]\n"
        "evaluate: {data: test.jsonl, general_text: text.txt}\n"
    )
    monkeypatch.chdir(tmp_path)
    e = read_experiment(Path("exp/e.yaml"))
    assert e.config().data == str(folder / "rows.jsonl")
    assert e.config(e.variants[1].overrides).data == str(folder / "other.jsonl")
    assert e.evaluation == {"data": str(folder / "test.jsonl"), "general_text": str(folder / "text.txt")}
    assert read_experiment(Path("exp/e.yaml"), {"data": "mine.jsonl"}).config().data == "mine.jsonl"


def test_a_run_started_with_a_relative_path_resumes_with_the_absolute_one(
    tiny_model_dir, tmp_path, monkeypatch
):
    make_data(tmp_path / "up.jsonl")
    monkeypatch.chdir(tmp_path)
    train(config(tiny_model_dir, Path("up.jsonl"), tmp_path / "run", max_steps=2, checkpoint_every=2))
    resumed = train(config(tiny_model_dir, tmp_path / "up.jsonl", tmp_path / "run", max_steps=3), resume=True)
    assert resumed.steps == 3 and os.path.isabs(load_config(tmp_path / "run" / "config.yaml").data)
