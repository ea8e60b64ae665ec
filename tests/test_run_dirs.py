"""A run's output directory: one run per directory (refused, overwritten or resumed, never mixed),
checked before the model loads, cleaned of what interrupted runs left, and saved adapters that
replace their old directory whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from test_train import adapter_tensors, cli_args, config, make_data

from peftkit.cli import main
from peftkit.errors import AdapterFileError, CheckpointError, ConfigError
from peftkit.formats.peft import read_adapter, write_adapter
from peftkit.train import distributed
from peftkit.train.checkpoint import Position
from peftkit.train.loop import train
from peftkit.train.optim import Trainable
from peftkit.train.report import read_metrics
from peftkit.train.run_dir import check_run_dir
from peftkit.train.setup import prepare


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "up.jsonl")


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


# -- one run per directory ----------------------------------------------------------------------------
def test_a_second_run_into_a_finished_run_is_refused_before_the_model_loads(
    tiny_model_dir, data, tmp_path, capsys
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=4, eval_every=2))
    before = snapshot(out)
    missing_base = tmp_path / "no-such-model"  # loading it would fail: the refusal must come first
    assert main(["train", *cli_args(missing_base, data, out, max_steps=2)]) == 2
    err = capsys.readouterr().err
    assert f"error: output_dir {out} holds a previous run" in err
    assert "--overwrite" in err and "--resume" in err and "no-such-model" not in err
    with pytest.raises(ConfigError, match="holds a previous run"):
        train(config(tiny_model_dir, data, out, max_steps=2))
    assert snapshot(out) == before  # config, metrics, plot and adapters untouched


def test_overwrite_replaces_the_previous_run_and_keeps_files_that_are_not_the_runs(
    tiny_model_dir, data, tmp_path
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=8, eval_every=4, checkpoint_every=4))
    assert (out / "adapter-best").is_dir()
    (out / "notes.txt").write_text("mine")
    result = train(config(tiny_model_dir, data, out, max_steps=3, val_fraction=0.0), overwrite=True)
    # Nothing of the old run is reported or kept: no stale best adapter, checkpoints or metrics.
    assert result.adapter_dir == out / "adapter-last" and result.steps == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output"] == str(out / "adapter-last") and summary["best_output"] is None
    assert not (out / "adapter-best").exists() and not (out / "checkpoints").exists()
    assert steps_logged(out) == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_directory_that_is_not_a_peftkit_run(tiny_model_dir, data, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="does not look like a peftkit run"):
        train(config(tiny_model_dir, data, other, max_steps=1), overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # A hand-written config.yaml (as passed to `peftkit train`) does not make a directory a run.
    (other / "config.yaml").write_text(f"base: {tiny_model_dir}\ndata: {data}\nmethod: lora\nlr: 0.01\n")
    with pytest.raises(ConfigError, match="does not look like a peftkit run"):
        train(config(tiny_model_dir, data, other, max_steps=1), overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "notes.txt"]
    # Not even a run in the home directory is cleared: a run needs a directory of its own.
    home = tmp_path / "home"
    train(config(tiny_model_dir, data, home, max_steps=1))
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ConfigError, match="is your home or the root directory"):
        train(config(tiny_model_dir, data, home, max_steps=1), overwrite=True)
    with pytest.raises(ConfigError, match="pass one of them"):
        train(config(tiny_model_dir, data, home, max_steps=1), overwrite=True, resume=True)


def test_a_new_run_is_refused_a_directory_of_other_files_before_the_model_loads(data, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    missing_base = tmp_path / "no-such-model"  # loading it would fail: the refusal must come first
    assert main(["train", *cli_args(missing_base, data, mine, max_steps=1)]) == 2
    err = capsys.readouterr().err
    assert f"error: output_dir {mine} is not empty (notes.txt, photos) and holds no peftkit run" in err
    assert "choose another output_dir" in err and "no-such-model" not in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "photos"]
    # New, empty, or holding only what an interrupted run's writes left, or peftkit demo's marker: fine.
    for name, entries in {"new": [], "empty": [], "leftover": [".config.yaml.tmp-0123456789ab"],
                          "demo": ["demo.json"]}.items():  # fmt: skip
        out = tmp_path / name
        if name != "new":
            out.mkdir()
        for entry in entries:
            (out / entry).write_text("{}")
        check_run_dir(out, resume=False, overwrite=False)


def test_a_new_run_over_an_old_one_keeps_and_resumes_its_own_checkpoints(
    tiny_model_dir, data, tmp_path, capsys
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=8, checkpoint_every=4))
    # The old run's step-8 must not outrank (and prune) the new run's checkpoints.
    train(config(tiny_model_dir, data, out, max_steps=4, checkpoint_every=2), overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    capsys.readouterr()
    resumed = train(config(tiny_model_dir, data, out, max_steps=6, checkpoint_every=2), resume=True)
    assert (
        resumed.steps == 6
        and f"resuming from {out / 'checkpoints' / 'step-00000004'}" in capsys.readouterr().out
    )


def test_resuming_from_an_older_checkpoint_removes_the_later_ones(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    train(config(tiny_model_dir, data, out, max_steps=8, checkpoint_every=4))
    older = checkpoints / "step-00000004"
    capsys.readouterr()
    # Back to step 4 (keeping one checkpoint): the abandoned step-8 must not outrank the new ones.
    train(
        config(tiny_model_dir, data, out, max_steps=6, checkpoint_every=2, keep_checkpoints=1), resume=older
    )
    err = capsys.readouterr().err
    assert "removed the checkpoints after step 4, which this run redoes: step-00000008" in err
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000006"]
    resumed = train(config(tiny_model_dir, data, out, max_steps=7, checkpoint_every=2), resume=True)
    assert resumed.steps == 7 and f"resuming from {checkpoints / 'step-00000006'}" in capsys.readouterr().out
    assert steps_logged(out) == list(range(1, 8))


def test_the_errors_name_the_command_line_flag_and_the_python_keyword(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2))
    with pytest.raises(ConfigError) as refused:
        train(config(tiny_model_dir, data, out, max_steps=2))
    with pytest.raises(CheckpointError) as nothing_to_resume:
        train(config(tiny_model_dir, data, out, max_steps=4), resume=True)
    with pytest.raises(ConfigError) as both:
        train(config(tiny_model_dir, data, out, max_steps=4), resume=True, overwrite=True)
    for error in (refused, nothing_to_resume, both):
        assert "--overwrite (overwrite=True in Python)" in str(error.value), error.value
    for error in (refused, both):
        assert "--resume (resume=True in Python)" in str(error.value), error.value


# -- checked before the model loads -------------------------------------------------------------------
def test_a_missing_data_file_fails_before_the_model_loads(tmp_path, capsys):
    args = cli_args(tmp_path / "no-such-model", tmp_path / "missing.jsonl", tmp_path / "run")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "no such file" in err and "no-such-model" not in err


def test_an_unusable_output_dir_fails_before_the_model_loads(data, tmp_path, capsys, read_only_dir):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    read_only = read_only_dir  # (root too)
    cases = {
        a_file: "exists and is not a directory",
        a_file / "run": "cannot be written",
        read_only: "cannot be written",
        read_only / "run": "cannot be written",
    }
    for out, problem in cases.items():
        assert main(["train", *cli_args(tmp_path / "no-such-model", data, out)]) == 2
        err = capsys.readouterr().err
        assert f"error: output_dir {out} {problem}" in err and "no-such-model" not in err, err


# -- leftovers of interrupted runs --------------------------------------------------------------------
def test_resume_removes_what_interrupted_writes_left_and_ignores_half_deleted_checkpoints(
    tiny_model_dir, data, tmp_path
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=8, checkpoint_every=4, keep_checkpoints=3))
    checkpoints = out / "checkpoints"
    half_written = checkpoints / ".step-00000012.tmp-0123456789ab"
    half_written.mkdir()
    (half_written / "trainable.safetensors").write_bytes(b"partial")
    half_deleted = checkpoints / "step-00000016"  # pruning got as far as its weights
    half_deleted.mkdir()
    (half_deleted / "state.json").write_bytes((checkpoints / "step-00000008" / "state.json").read_bytes())
    (checkpoints / "step-00000002").mkdir()  # pruning got as far as its state.json
    (out / ".adapter-last.tmp-0123456789ab").mkdir()
    (out / ".metrics.jsonl.tmp-0123456789ab").write_text("")
    result = train(config(tiny_model_dir, data, out, max_steps=10, checkpoint_every=4), resume=True)
    assert result.steps == 10
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000008"]
    assert hidden_leftovers(out) == []


def test_resume_rewrites_the_metrics_from_its_checkpoint_and_survives_a_torn_last_line(
    tiny_model_dir, data, tmp_path
):
    common = {"schedule": "constant", "warmup_ratio": 0.0, "checkpoint_every": 4, "eval_every": 100}
    train(config(tiny_model_dir, data, tmp_path / "whole", max_steps=12, **common))
    part = tmp_path / "part"
    train(config(tiny_model_dir, data, part, max_steps=10, **common))  # logged steps 9, 10 after step-8
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "epoch": 1.4, "loss": 5.1')  # a write cut short by a kill
    train(config(tiny_model_dir, data, part, max_steps=12, **common), resume=True)
    assert steps_logged(part) == list(range(1, 13))  # each step once
    curve = lambda run: [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert curve(part) == curve(tmp_path / "whole")


def test_tensorboard_shows_each_step_once_after_a_resume(tiny_model_dir, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = {"checkpoint_every": 4, "eval_every": 100, "tensorboard": True}
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=10, **common))  # logged steps 9, 10 after step-8
    train(config(tiny_model_dir, data, out, max_steps=12, **common), resume=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == list(range(1, 13))  # each step once: the first run's 9 and 10 are purged
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(
        [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    )


def test_an_adapter_moved_aside_by_an_interrupted_replacement_is_put_back(
    tiny_model_dir, data, tmp_path, capsys
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=8, eval_every=4, checkpoint_every=8))
    best = snapshot(out / "adapter-best")
    # The process died inside io.replace_by_renames: the old adapter-best renamed away, the new one
    # still under its temporary name. The renamed one is the only complete copy.
    moved = out / ".adapter-best.old-0123456789ab"
    (out / "adapter-best").rename(moved)
    (out / ".adapter-best.tmp-0123456789ab").mkdir()
    (out / ".adapter-best.tmp-0123456789ab" / "adapter_model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    result = train(config(tiny_model_dir, data, out, max_steps=10, eval_every=100), resume=True)
    assert f"put back {out / 'adapter-best'} from {moved.name}" in capsys.readouterr().err
    assert result.adapter_dir == out / "adapter-best" and hidden_leftovers(out) == []
    # The run validates at its last step too: adapter-best is the one put back unless step 10 did better.
    step_8 = [
        r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r["step"] == 8 and "val_loss" in r
    ]
    if result.best_val_loss == step_8[0]:
        assert snapshot(out / "adapter-best") == best
    else:
        assert json.loads((out / "adapter-best" / "training.json").read_text())["step"] == 10
    # A new run's directory holds no run: such a leftover there is debris, not the new run's result.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (out / "adapter-best").rename(fresh / ".adapter-best.old-0123456789ab")
    train(config(tiny_model_dir, data, fresh, max_steps=2, val_fraction=0.0))
    assert not (fresh / "adapter-best").exists() and hidden_leftovers(fresh) == []


def test_an_interrupted_deletion_is_finished_not_undone(tiny_model_dir, data, tmp_path, capsys):
    """remove_dir's leftover (.NAME.del-*) is a directory being deleted, maybe half gone: a resume
    removes it and never puts it back as the run's result."""
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=4, eval_every=4, checkpoint_every=2))
    half = out / ".adapter-best.del-0123456789ab"
    (out / "adapter-best").rename(half)
    (half / "adapter_model.safetensors").unlink()  # the deletion had got this far
    result = train(config(tiny_model_dir, data, out, max_steps=5, eval_every=100), resume=True)
    err = capsys.readouterr().err
    assert "put back" not in err and not half.exists()
    # The best comes back whole, from the checkpoint's copy.
    assert "restored adapter-best from step-00000004: step 4's" in err
    assert result.adapter_dir == out / "adapter-best"


def test_an_adapter_saved_through_a_link_goes_where_the_link_points(tmp_path):
    config_json, tensors = adapter_files(1)
    for name, populate in (("empty", False), ("full", True)):
        target = tmp_path / f"target-{name}"
        target.mkdir()
        if populate:
            write_adapter(target, *adapter_files(2), {})
        link = tmp_path / f"link-{name}"
        link.symlink_to(target)
        write_adapter(link, config_json, tensors, {})
        assert link.is_symlink() and read_adapter(link).config["lora_alpha"] == 4
        assert read_adapter(target).config["lora_alpha"] == 4
        assert hidden_leftovers(tmp_path) == []


def test_an_adapter_is_not_saved_over_the_working_directory(tmp_path, monkeypatch):
    """Replacing it whole would leave the user's shell in a deleted directory."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for target in (Path("."), tmp_path):
        with pytest.raises(AdapterFileError, match="is or holds the current working directory"):
            write_adapter(target, *adapter_files(1), {})
    assert list((tmp_path / "here").iterdir()) == [] and hidden_leftovers(tmp_path) == []


# -- adapters replace their directory whole ----------------------------------------------------------
def adapter_files(seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    key = "base_model.model.layer.lora_A.weight"
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4 * seed, "target_modules": ["layer"]}, {
        key: torch.randn(2, 8, generator=g)
    }


def test_an_adapter_saved_over_a_damaged_one_replaces_it_whole_and_keeps_other_files(tmp_path):
    directory = tmp_path / "adapter"
    write_adapter(directory, *adapter_files(1), {})
    (directory / "README.md").write_text("notes")
    (directory / "adapter_config.json").unlink()
    (directory / "adapter_config.json").mkdir()  # damaged: moving files in one by one fails here
    (directory / "adapter_config.json" / "x").write_text("")
    config, tensors = adapter_files(2)
    write_adapter(directory, config, tensors, {})
    files = read_adapter(directory)
    assert files.config["lora_alpha"] == 8 and torch.equal(
        next(iter(files.tensors.values())), *tensors.values()
    )
    assert (directory / "README.md").read_text() == "notes"
    assert hidden_leftovers(tmp_path) == []


def test_a_failed_adapter_save_leaves_the_old_adapter_whole(tmp_path):
    directory = tmp_path / "adapter"
    write_adapter(directory, *adapter_files(1), {})
    before = snapshot(directory)
    config, _ = adapter_files(2)
    with pytest.raises((TypeError, ValueError, AttributeError)):
        write_adapter(directory, config, {"w": "not a tensor"}, {})  # fails inside the build
    assert snapshot(directory) == before and hidden_leftovers(tmp_path) == []


def test_an_adapter_is_not_saved_into_a_directory_that_holds_other_files(tmp_path):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "train.py").write_text("print('mine')\n")
    before = snapshot(project)
    with pytest.raises(AdapterFileError) as e:
        write_adapter(project, *adapter_files(1), {})
    assert str(project) in str(e.value) and ".git, train.py" in str(e.value)
    assert "save into an empty directory or an adapter directory" in str(e.value)
    assert snapshot(project) == before and hidden_leftovers(tmp_path) == []
    # An empty directory, or one that holds an adapter (with other files beside it), is fine.
    (tmp_path / "empty").mkdir()
    write_adapter(tmp_path / "empty", *adapter_files(1), {})
    (tmp_path / "empty" / "training.json").write_text("{}")
    write_adapter(tmp_path / "empty", *adapter_files(2), {})
    assert read_adapter(tmp_path / "empty").config["lora_alpha"] == 8
    assert (tmp_path / "empty" / "training.json").read_text() == "{}"


def test_a_training_save_writes_the_adapter_straight_into_its_one_temporary_directory(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    import peftkit.formats.peft as peft_format

    p = prepare(config(tiny_model_dir, data, tmp_path / "run"), distributed.Dist())
    out = tmp_path / "run"
    out.mkdir()
    seen = []

    def write_safetensors(path: Path, *args) -> None:
        seen.append((path.parent, hidden_leftovers(out)))  # what exists while the adapter is written
        write(path, *args)

    write = peft_format.write_safetensors
    monkeypatch.setattr(peft_format, "write_safetensors", write_safetensors)
    p.save_weights(out / "adapter-last", Position(step=1), Trainable.of(p.net))
    ((directory, hidden),) = seen
    assert hidden == [directory.name] and directory.name.startswith(".adapter-last.tmp-")
    assert read_adapter(out / "adapter-last").tensors and hidden_leftovers(out) == []


class _DiskFull:
    """A lineage value whose writing fails, as a full disk would, halfway through a save."""

    def __str__(self) -> str:
        raise OSError(28, "No space left on device")


def test_a_training_save_replaces_adapter_and_sidecars_in_one_step(tiny_model_dir, data, tmp_path):
    p = prepare(config(tiny_model_dir, data, tmp_path / "run"), distributed.Dist())
    trainable = Trainable.of(p.net)
    last = tmp_path / "run" / "adapter-last"
    p.save_weights(last, Position(step=1), trainable)
    before = snapshot(last)
    with torch.no_grad():
        for master in trainable.masters:
            master.add_(1.0)
    p.lineage["encode_stats"] = {"note": _DiskFull()}  # training.json is written after the adapter
    with pytest.raises(OSError, match="No space left"):
        p.save_weights(last, Position(step=2), trainable)
    assert snapshot(last) == before  # not the new weights beside the old training.json
    assert hidden_leftovers(last.parent) == []
    p.lineage["encode_stats"] = {}
    p.save_weights(last, Position(step=2), trainable)
    assert json.loads((last / "training.json").read_text())["step"] == 2
    assert sorted(p.name for p in last.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training.json", "training_config.yaml",
    ]  # fmt: skip
    old, new = load(before["adapter_model.safetensors"]), adapter_tensors(last)
    assert old.keys() == new.keys() and not any(torch.equal(old[k], new[k]) for k in old)


def test_replacing_by_renames_swaps_the_whole_directory(tmp_path):
    from peftkit.io import replace_by_renames

    final, new = tmp_path / "final", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_by_renames(new, final)  # the path taken where the OS cannot exchange two directories
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and not new.exists()
    assert hidden_leftovers(tmp_path) == []


def test_a_run_never_writes_into_its_inputs_home_or_root(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cases = {
        tiny_model_dir: "is the base model directory",
        tiny_model_dir / "run": "is inside the base model directory",
        data: "exists and is not a directory",
        home: "is your home or the root directory",
        Path("/"): "is your home or the root directory",
    }
    before = snapshot(tiny_model_dir)
    for out, problem in cases.items():
        assert main(["train", *cli_args(tiny_model_dir, data, out)]) == 2
        err = capsys.readouterr().err
        assert f"error: output_dir {out} {problem}" in err, err
    assert snapshot(tiny_model_dir) == before
    # --overwrite deletes the run's entries: an input inside one of them (a full fine-tune's model-last
    # used as the base) is refused; an input elsewhere in the directory (its data file) is kept.
    project = tmp_path / "project"
    train(config(tiny_model_dir, data, project, max_steps=1))
    shutil.copytree(tiny_model_dir, project / "model-last")
    own_data = make_data(project / "mine.jsonl")
    args = cli_args(project / "model-last", own_data, project, max_steps=1)
    assert main(["train", *args, "--overwrite"]) == 2
    assert "contains the base model directory" in capsys.readouterr().err
    assert (project / "model-last" / "config.json").is_file()
    assert main(["train", *cli_args(tiny_model_dir, own_data, project, max_steps=1), "--overwrite"]) == 0
    assert own_data.is_file() and not (project / "model-last").exists()
