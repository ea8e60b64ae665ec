"""The training pipeline on a tiny saved Llama: it learns, saves everything, resumes exactly, and
splits batches (accumulation, processes) without changing the result."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from peftkit import AdaptedModel
from peftkit.base import load_base
from peftkit.cli import main
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
    deadline = time.time() + 900  # a hang guard: it waits for a checkpoint, however slow the machine
    while (
        not list((run / "checkpoints").glob("step-*/state.json"))
        and time.time() < deadline
        and proc.poll() is None
    ):
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
        env=env, check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "peftkit", *args, "--batch_size", "8", "--output_dir", str(tmp_path / "one")],
        env=env, check=True, capture_output=True, timeout=900,
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

    assert main(["train", "--lora.rank", "4"]) == 2  # argparse: no such option (not a prefix of rank_pattern)
    assert "--lora.rank: did you mean --lora.r?" in capsys.readouterr().err
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


# -- hardening: runs without validation, changed inputs, divergence, Ctrl-C, damaged checkpoints --------
def cli_args(model_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    """`peftkit train` options for `config(...)`'s settings (plus overrides)."""
    values = {
        "base": model_dir, "data": data, "output_dir": out, "batch_size": 8, "lr": 0.01, "max_steps": 24,
        "precision": "fp32", "progress": "false", "tensorboard": "false", "lora.r": 4, "lora.lora_alpha": 8,
        "val_fraction": 0.125, "seed": 1, **overrides,
    }  # fmt: skip
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def test_a_run_without_validation_data_saves_the_last_adapter_and_says_there_is_no_best(
    tiny_model_dir, data, tmp_path, capsys
):
    result = train(config(tiny_model_dir, data, tmp_path / "none", val_fraction=0.0, max_steps=2))
    assert result.adapter_dir == tmp_path / "none" / "adapter-last" and result.best_val_loss is None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "none" / "adapter-best").exists()
    assert "no validation examples, so there is no adapter-best" in capsys.readouterr().err
    # A one-row file leaves nothing to hold out either; the command line says the same.
    one_row = make_data(tmp_path / "one.jsonl", n=1)
    assert main(["train", *cli_args(tiny_model_dir, one_row, tmp_path / "one", max_steps=1)]) == 0
    assert "no adapter-best" in capsys.readouterr().err
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["val_examples"] == 0 and summary["best_output"] is None
    assert summary["output"] == str(tmp_path / "one" / "adapter-last")


def test_resume_refuses_changed_data_or_base_weights_unless_allowed(tiny_model_dir, tmp_path, capsys):
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    data = make_data(tmp_path / "up.jsonl")
    out = tmp_path / "run"
    first = train(config(base, data, out, max_steps=4, checkpoint_every=2))
    resume = ["train", *cli_args(base, data, out, max_steps=6, checkpoint_every=2), "--resume"]

    make_data(data, seed=7)  # the same file, other rows
    new_hash = dataset_hash(split_examples(load_examples(data), 0.125, seed=1)[0])
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "error: cannot resume from" in err and "the training data changed" in err
    assert first.summary["dataset_hash"][7:19] in err and new_hash[7:19] in err
    assert "--allow-changed-inputs (allow_changed_inputs=True in Python)" in err

    make_data(data, seed=0)  # the data is back; now the base weights change
    model = LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(base)
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "the base model changed" in err and first.summary["base_fingerprint"][7:19] in err
    assert "training data" not in err

    assert main([*resume, "--allow-changed-inputs"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "the base model changed" in err
    facts = json.loads((out / "adapter-last" / "training.json").read_text())
    (change,) = facts["changed_inputs"]
    assert change["step"] == 4 and change["base_fingerprint"][0] == first.summary["base_fingerprint"]
    assert change["base_fingerprint"][1] == facts["base_fingerprint"] != first.summary["base_fingerprint"]


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing_from_it(
    tiny_model_dir, data, tmp_path, capsys
):
    out = tmp_path / "run"
    args = cli_args(tiny_model_dir, data, out, lr=1e30, max_steps=6, checkpoint_every=1, eval_every=100)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "error: step 2: the training loss is nan" in err and "Lower the learning rate" in err
    # Neither way out deletes the good checkpoint or repeats the same steps with the same lr.
    assert f"the last good checkpoint, {out / 'checkpoints' / 'step-00000001'}, is kept" in err
    assert "start a new run in another output_dir" in err
    assert "--overwrite" not in err and "--resume" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # the last good one
    assert not (out / "adapter-last").exists() and not (out / "summary.json").exists()
    weights = load_file(out / "checkpoints" / "step-00000001" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_refuses_a_checkpoint_with_nan_weights(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=4, checkpoint_every=2))
    newest = out / "checkpoints" / "step-00000004"
    weights = load_file(newest / "trainable.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, newest / "trainable.safetensors")
    before = adapter_tensors(out / "adapter-last")
    assert main(["train", *cli_args(tiny_model_dir, data, out, max_steps=6), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot resume from checkpoint {newest}" in err and "NaN or inf" in err
    assert "step-00000002" in err  # the older checkpoint to fall back on
    after = adapter_tensors(out / "adapter-last")
    assert all(torch.equal(before[k], after[k]) for k in before)


DAMAGE = {
    "best_val not a number": ("position", "best_val", "x"),
    "best_val NaN": ("position", "best_val", float("nan")),
    "extra not an object": ("position", "extra", [1]),
    "negative step": ("position", "step", -4),
    "inputs not an object": (None, "inputs", ["dataset_hash"]),
}


@pytest.mark.parametrize(
    "damage",
    ["torn state.json", "state.json without its sections", "wrong shapes", "optimizer key without a name"]
    + list(DAMAGE),
)
def test_a_damaged_checkpoint_is_an_error_naming_it_and_the_way_out(
    tiny_model_dir, data, tmp_path, capsys, damage
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=4, checkpoint_every=2))
    newest = out / "checkpoints" / "step-00000004"
    state = newest / "state.json"
    if damage == "torn state.json":
        state.write_text(state.read_text()[:100])
    elif damage == "state.json without its sections":
        state.write_text('{"format": 1}')
    elif damage == "wrong shapes":
        weights = load_file(newest / "trainable.safetensors")
        save_file({k: torch.zeros(2, 3) for k in weights}, newest / "trainable.safetensors")
    elif damage == "optimizer key without a name":
        tensors = load_file(newest / "optimizer.safetensors")
        key = next(k for k in tensors if k.startswith("state.0."))
        tensors["state.0"] = tensors.pop(key)
        save_file(tensors, newest / "optimizer.safetensors")
    else:
        section, key, value = DAMAGE[damage]
        saved = json.loads(state.read_text())
        (saved[section] if section else saved)[key] = value
        state.write_text(json.dumps(saved))
    assert main(["train", *cli_args(tiny_model_dir, data, out, max_steps=6), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot resume from checkpoint {newest}" in err, err
    assert "step-00000002" in err and "--overwrite" in err


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_uninterrupted_adapter(tiny_model_dir, data, tmp_path):
    # checkpoint_every stays 0: Ctrl-C alone must leave something to resume from.
    args = [
        "--base", str(tiny_model_dir), "--data", str(data), "--max_steps", "300", "--batch_size", "8",
        "--lr", "0.01", "--precision", "fp32", "--progress", "false", "--tensorboard", "false",
        "--lora.r", "4", "--eval_every", "100", "--seed", "3",
    ]  # fmt: skip
    assert main(["train", *args, "--output_dir", str(tmp_path / "whole")]) == 0
    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "peftkit", "train", *args, "--output_dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # As in a terminal: SIGINT is not ignored (a background job's would be, and Python keeps that).
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore
    )
    deadline = time.time() + 900  # a hang guard: it waits for the first step, however slow the machine
    while not read_metrics(run / "metrics.jsonl") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err
    (checkpoint,) = (run / "checkpoints").iterdir()
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 300 and f"--resume (resume=True in Python) to continue from step {step}" in err
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True
    subprocess.run([*cmd, "--resume"], env=env, check=True, capture_output=True, timeout=900)
    a, b = adapter_tensors(tmp_path / "whole" / "adapter-last"), adapter_tensors(run / "adapter-last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert losses == list(range(1, 301))  # every step once, none repeated after the resume
