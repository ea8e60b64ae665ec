"""`peftkit eval` says so beside the score when an adapter is scored on its own training data (the
training examples' hash is recorded in the adapter; eval/heldout.py rebuilds them from the data).

A real `peftkit train` run of one step on conftest's tiny Llama, then the eval command in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import make_data

from peftkit.cli import main
from peftkit.data.files import load_examples, split_examples


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the training data: 12 rows, a quarter held out for validation; the adapter one step made)."""
    tmp = tmp_path_factory.mktemp("heldout")
    data = make_data(tmp / "up.jsonl", n=12)
    args = ["train", "--base", tiny_model_dir, "--data", data, "--output_dir", tmp / "run", "--max_steps", 1]
    args += ["--batch_size", 4, "--precision", "fp32", "--progress", "false", "--tensorboard", "false"]
    args += ["--lora.r", 2, "--val_fraction", 0.25, "--seed", 3]
    assert main([str(a) for a in args]) == 0
    return data, tmp / "run" / "adapter-last"


def evaluate(data: Path, adapter: Path, base: Path, tmp_path: Path, capsys) -> tuple[str, dict]:
    capsys.readouterr()
    report = tmp_path / "r.json"
    argv = [
        "eval",
        data,
        "--base",
        base,
        "--adapters",
        adapter,
        "--n",
        0,
        "--max-new-tokens",
        2,
        "--json",
        report,
    ]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    results = {r["adapter"]: r for r in json.loads(report.read_text())["results"]}
    return capsys.readouterr().out, results


def test_eval_on_the_training_file_says_which_share_the_adapter_learned_from(
    trained: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    data, adapter = trained
    out, results = evaluate(data, adapter, tiny_model_dir, tmp_path, capsys)
    assert results["adapter-last"]["trained_on"] == 9 and results["base"]["trained_on"] is None
    row = next(line for line in out.splitlines() if line.startswith("adapter-last"))
    assert row.split()[1].endswith("*")  # beside the score
    assert "* 'adapter-last' was trained on 9 of these 12 examples: its score is not held-out" in out


def test_eval_on_exactly_the_training_examples_and_on_other_data(
    trained: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    data, adapter = trained
    train_rows, _ = split_examples(load_examples(data), 0.25, seed=3)
    only_train = tmp_path / "train-rows.jsonl"
    only_train.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in train_rows))
    out, results = evaluate(only_train, adapter, tiny_model_dir, tmp_path, capsys)
    assert results["adapter-last"]["trained_on"] == 9
    assert "was trained on these 9 examples: its score is not held-out" in out
    other = make_data(tmp_path / "other.jsonl", n=6, seed=1)
    out, results = evaluate(other, adapter, tiny_model_dir, tmp_path, capsys)
    assert results["adapter-last"]["trained_on"] is None and "not held-out" not in out and "*" not in out
