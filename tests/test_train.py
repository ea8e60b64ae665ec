"""The training pipeline on a tiny saved Llama: it learns, saves everything, resumes exactly, and
splits batches (accumulation, processes) without changing the result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from peftkit import AdaptedModel
from peftkit.base import load_base
from peftkit.data import dataset_hash, encode_all, load_examples, split_examples
from peftkit.train import distributed
from peftkit.train.config import load_config
from peftkit.train.loop import accumulate, epoch_batches, train
from peftkit.train.report import read_metrics
from peftkit.train.setup import prepare

ROOT = Path(__file__).resolve().parents[1]


def make_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """'up abc' -> 'ABC': short, learnable, with answers of a few tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": f"up {word}", "completion": word.upper()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(model_dir: Path, data: Path, out: Path, **overrides):
    values = {
        "base": str(model_dir),
        "data": str(data),
        "output_dir": str(out),
        "batch_size": 8,
        "lr": 1e-2,
        "max_steps": 24,
        "precision": "fp32",
        "progress": False,
        "tensorboard": False,
        "lora.r": 4,
        "lora.lora_alpha": 8,
        "val_fraction": 0.125,
        "seed": 1,
    }
    values.update(overrides)
    return load_config(None, values)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "up.jsonl")


def test_training_lowers_the_loss_and_saves_adapter_config_metrics_and_plot(tiny_model_dir, data, tmp_path):
    c = config(tiny_model_dir, data, tmp_path / "run", eval_every=8, max_steps=48, tensorboard=True)
    result = train(c)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 48 and result.steps == 48
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses
    assert result.adapter_dir == tmp_path / "run" / "adapter-best"
    for name in ("adapter-best", "adapter-last"):
        saved = tmp_path / "run" / name
        assert load_config(saved / "training_config.yaml") == c  # the resolved config, beside the adapter
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # Lineage: the training data's hash is in the adapter's metadata and the summary.
    train_ex, val_ex = split_examples(load_examples(data), 0.125, seed=1)
    with safe_open(str(tmp_path / "run" / "adapter-last" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["peftkit_dataset_hash"] == dataset_hash(train_ex)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset_hash"] == dataset_hash(train_ex)
    # The best adapter, reloaded, gives exactly the best validation loss the run recorded.
    model, tok = load_base(str(tiny_model_dir), dtype=torch.float32)
    am = AdaptedModel.from_pretrained(model, result.adapter_dir)
    encoded, _ = encode_all(val_ex, tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            logits = am(torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            total += torch.nn.functional.cross_entropy(
                logits, labels, ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    assert total / count == pytest.approx(summary["best_val_loss"], rel=1e-5)
    assert (
        summary["best_val_loss"]
        < min(r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r)
        + 1e-9
    )


def test_extending_a_run_from_its_checkpoint_continues_the_same_curve(tiny_model_dir, data, tmp_path):
    common = {"schedule": "constant", "warmup_ratio": 0.0, "checkpoint_every": 4, "eval_every": 100}
    whole = train(config(tiny_model_dir, data, tmp_path / "whole", max_steps=12, **common))
    train(config(tiny_model_dir, data, tmp_path / "part", max_steps=8, **common))
    resumed = train(config(tiny_model_dir, data, tmp_path / "part", max_steps=12, **common), resume=True)
    assert resumed.steps == whole.steps == 12
    curve = lambda run: [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert curve("part") == curve("whole")  # bit for bit, steps 1-12
    a, b = (
        adapter_tensors(tmp_path / "whole" / "adapter-last"),
        adapter_tensors(tmp_path / "part" / "adapter-last"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_resumes_to_the_same_adapter(tiny_model_dir, data, tmp_path):
    args = [
        "--base", str(tiny_model_dir), "--data", str(data), "--max_steps", "40", "--batch_size", "8",
        "--lr", "0.01", "--precision", "fp32", "--progress", "false", "--tensorboard", "false",
        "--lora.r", "4", "--checkpoint_every", "5", "--eval_every", "100", "--seed", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "peftkit", "train", *args]
    subprocess.run([*cmd, "--output_dir", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--output_dir", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step-*/state.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter-last").exists(), "the run should have been killed before finishing"
    subprocess.run([*cmd, "--output_dir", str(run), "--resume"], env=env, check=True, capture_output=True)
    a, b = adapter_tensors(tmp_path / "whole" / "adapter-last"), adapter_tensors(run / "adapter-last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tiny_model_dir, data, tmp_path):
    p = prepare(config(tiny_model_dir, data, tmp_path / "run", batch_size=6), distributed.Dist())
    batch = epoch_batches(p.train_set, p.config, 1, 0)[0]
    params = [q for q in p.net.parameters() if q.requires_grad]

    def grads(window: list[list[int]]) -> list[torch.Tensor]:
        for q in params:
            q.grad = None
        accumulate(p, window)
        return [q.grad.clone() for q in params]

    whole = grads([batch])
    split = grads([batch[:2], batch[2:3], batch[3:]])  # uneven micro-batches, different padding
    assert any(g.abs().sum() > 0 for g in whole)
    for g1, g2 in zip(whole, split, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, data, tmp_path):
    args = [
        "train", "--base", str(tiny_model_dir), "--data", str(data), "--max_steps", "6", "--lr", "0.01",
        "--precision", "fp32", "--progress", "false", "--tensorboard", "false", "--lora.r", "4", "--eval_every", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    subprocess.run(
        [*torchrun, "-m", "peftkit", *args, "--batch_size", "4", "--output_dir", str(tmp_path / "two")],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "peftkit", *args, "--batch_size", "8", "--output_dir", str(tmp_path / "one")],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    curve = lambda run, key: [r[key] for r in read_metrics(tmp_path / run / "metrics.jsonl") if key in r]  # noqa: E731
    for key in ("loss", "val_loss"):
        assert len(curve("one", key)) == len(curve("two", key)) > 0
        for x, y in zip(curve("one", key), curve("two", key), strict=True):
            assert abs(x - y) < 1e-4 * max(1.0, abs(x)), (key, curve("one", key), curve("two", key))
    a, b = (
        adapter_tensors(tmp_path / "one" / "adapter-last"),
        adapter_tensors(tmp_path / "two" / "adapter-last"),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)


def test_full_fine_tuning_trains_every_weight_and_saves_a_model(tiny_model_dir, data, tmp_path):
    result = train(config(tiny_model_dir, data, tmp_path / "full", method="full", lr=1e-3, max_steps=12))
    assert result.adapter_dir is None and result.model_dir is not None
    before, _ = load_base(str(tiny_model_dir), dtype=torch.float32)
    after, _ = load_base(str(result.model_dir), dtype=torch.float32)
    changed = [n for n, w in after.state_dict().items() if not torch.equal(w, before.state_dict()[n])]
    assert len(changed) >= len(before.state_dict()) - 1  # every weight moved (rotary buffers aside)
    losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]


def test_bf16_training_keeps_fp32_masters_and_tracks_fp32(tiny_model_dir, data, tmp_path):
    runs = {}
    for precision in ("bf16", "fp32"):
        result = train(config(tiny_model_dir, data, tmp_path / precision, precision=precision, max_steps=24))
        runs[precision] = [
            r["loss"] for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r
        ]
    tensors = adapter_tensors(tmp_path / "bf16" / "adapter-last")
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # the masters are saved, not bf16 copies
    late = {k: sum(v[-6:]) / 6 for k, v in runs.items()}
    assert late["bf16"] < 0.75 * runs["bf16"][0]
    assert abs(late["bf16"] - late["fp32"]) < 0.1 * late["fp32"], late


def test_early_stopping_stops_when_validation_does_not_improve(tiny_model_dir, data, tmp_path):
    # A learning rate too small to change the loss: every validation after the first is no better.
    result = train(
        config(tiny_model_dir, data, tmp_path / "es", lr=1e-12, eval_every=2, early_stopping_patience=2)
    )
    assert result.steps == 6  # validations at steps 2 (best), 4 and 6 (no better) -> stop
    assert json.loads((tmp_path / "es" / "summary.json").read_text())["steps"] == 6


def test_lora_plus_gives_b_matrices_a_higher_learning_rate(tiny_model_dir, data, tmp_path):
    from peftkit.train.optim import Trainable, make_optimizer

    p = prepare(config(tiny_model_dir, data, tmp_path / "run", lora_plus_ratio=16.0), distributed.Dist())
    trainable = Trainable.of(p.net)
    optimizer = make_optimizer(trainable, p.config)
    lr_of = {id(t): g["lr"] for g in optimizer.param_groups for t in g["params"]}
    for name, master in zip(trainable.names, trainable.masters, strict=True):
        assert lr_of[id(master)] == pytest.approx(1e-2 * (16.0 if ".lora_B." in name else 1.0)), name


def test_cli_trains_from_a_yaml_file_with_command_line_overrides(tiny_model_dir, data, tmp_path):
    from peftkit.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {tiny_model_dir}\ndata: {data}\nmax_steps: 3\nbatch_size: 4\nlora:\n  r: 2\n")
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            str(cfg),
            "--lora.r",
            "3",
            "--output_dir",
            str(out),
            "--progress",
            "false",
            "--precision",
            "fp32",
        ]
    )
    assert code == 0
    saved = load_config(out / "config.yaml")
    assert (
        saved.lora.r == 3 and saved.lora.lora_alpha == 32 and saved.max_steps == 3 and saved.batch_size == 4
    )
    assert json.loads((out / "adapter-last" / "adapter_config.json").read_text())["r"] == 3


def test_cli_names_a_bad_key_and_exits_2(tmp_path, capsys):
    from peftkit.cli import main

    assert main(["train", "--lora.rank", "4"]) == 2  # argparse: no such option
    assert "--lora.rank" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert "'learning_rate'" in capsys.readouterr().err


def test_a_shipped_config_with_its_own_jsonl_data_trains(tiny_model_dir, tmp_path):
    c = load_config(ROOT / "examples" / "support_chat.yaml", {"base": str(tiny_model_dir), "max_steps": 2})
    c = c.replace(output_dir=str(tmp_path / "support"), progress=False, tensorboard=False, precision="fp32")
    result = train(c)
    assert result.steps == 2 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "support" / "summary.json").read_text())
    assert summary["train_examples"] + summary["val_examples"] == 10


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, data, tmp_path):
    curves = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        train(config(tiny_model_dir, data, out, max_steps=6, gradient_checkpointing=checkpointing))
        curves.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
