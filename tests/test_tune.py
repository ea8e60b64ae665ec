"""peftkit tune: the search syntax and its refusals, the study loop (seeding, resume, interruption, pruning)
on a stand-in trainer, and end to end on the tiny model through the CLI (real training processes)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.experiment import Outcome, read_experiment
from peftkit.train.config import load_config
from peftkit.tune import parse_space
from peftkit.tune.study import variant_starts

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_per_training_child")


def write(path, data):
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def tune(*args):
    return main(["tune", *map(str, args)])


# -- the search syntax ---------------------------------------------------------------------------------
def test_search_syntax_ranges_choices_nested_sections_and_defaults(tmp_path):
    f = write(
        tmp_path / "e.yaml",
        """
data: task:dates
search:
  lr: {low: 1e-4, high: 3e-3, log: true}
  batch_size: {low: 4, high: 16, step: 4}
  lora.alpha_over_r: [1, 2]
  lora: {r: [4, 8], target_modules: [all-linear, [q_proj, v_proj]]}
  method: [lora, ia3]
""",
    )
    params = {p.key: p for p in parse_space(read_experiment(f))}
    assert (params["lr"].kind, params["lr"].low, params["lr"].log) == (
        "float",
        1e-4,
        True,
    )  # "1e-4": YAML text
    assert (params["batch_size"].kind, params["batch_size"].step) == ("int", 4)
    assert params["lora.target_modules"].labels == ("all-linear", '["q_proj","v_proj"]')
    assert params["lora.target_modules"].value_of('["q_proj","v_proj"]') == ["q_proj", "v_proj"]
    assert params["lora.r"].section == "lora" and params["method"].section is None
    defaults = {p.key for p in parse_space(read_experiment(write(tmp_path / "d.yaml", "data: task:dates\n")))}
    assert defaults == {"lr", "lora.r", "lora.alpha_over_r", "lora.lora_dropout"}
    assert {p.key for p in parse_space(read_experiment(write(tmp_path / "i.yaml", "method: ia3\n")))} == {
        "lr"
    }


@pytest.mark.parametrize(
    "search, words",
    [
        ({"lora.rank": [4, 8]}, "search lora.rank: unknown key; valid keys under lora: r, lora_alpha"),
        ({"lora.lora_dropuot": [0.1]}, r"unknown key \(did you mean 'lora_dropout'\?\)"),
        ({"lorra.r": [4]}, r"'lorra' is no method section \(did you mean 'lora'\?\)"),
        ({"lr": {"low": 3e-3, "high": 1e-4}}, r"search lr: low \(0.003\) must be below high \(0.0001\)"),
        ({"lora.r": []}, "search lora.r: the list of choices is empty"),
        ({"lr": 1e-3}, "search lr: 0.001 is neither a range .* nor a list of choices"),
        ({"lr": {"low": 0, "high": 1e-3, "log": True}}, "a log-scale range needs low > 0"),
        ({"lora.r": {"low": 2.5, "high": 8}}, r"low must be an integer \(lora.r is int\)"),
        ({"lora.r": [4, 0]}, "search lora.r: the value 0 fails: .*r"),
        ({"ia3.target_modules": [["k_proj"]]}, "no trial uses method ia3"),
        ({"method": {"low": 1, "high": 2}}, "a range needs a numeric key"),
        ({"lr": {"low": 1e-4, "hi": 1e-3}}, "a range takes low, high"),
        ({"lora.lora_alpha": [8, 16], "lora.alpha_over_r": [1, 2]}, "search names both lora.lora_alpha and"),
        ({"output_dir": ["a", "b"]}, r"search output_dir: not a key to search \(each trial trains in"),
        ({"tensorboard": [True, False]}, "search tensorboard: not a key to search"),
        ({"eval_every": [2, 4]}, "search eval_every: not a key to search"),
    ],
)
def test_bad_search_specs_are_refused_before_anything_is_written(tmp_path, capsys, search, words):
    f = write(tmp_path / "e.yaml", {"data": "task:dates", "search": search})
    assert tune(f, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(words, err), err
    assert not (tmp_path / "out").exists()


def test_a_variant_value_yaml_reads_as_text_is_a_number(tmp_path):
    search = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    f = write(tmp_path / "e.yaml", {"data": "task:dates", "search": search,
                                    "variants": [{"name": "v", "lr": "1e-2"}]})  # fmt: skip
    experiment = read_experiment(f)
    assert variant_starts(experiment, parse_space(experiment)) == [("v", {"lr": 0.01})]
    g = write(
        tmp_path / "g.yaml", {"data": "task:dates", "search": search, "variants": [{"name": "v", "lr": 0.5}]}
    )
    with pytest.raises(
        ConfigError, match=r"variant 'v': lr=0.5 is outside the searched range \[0.0001, 0.1\]"
    ):
        variant_starts(read_experiment(g), parse_space(read_experiment(g)))


def test_a_variant_is_the_shared_config_on_the_searched_keys_it_leaves_out(tmp_path):
    """`{name: current, lr: 1e-3}` is the current run: r, dropout and alpha/r come from the shared
    keys, not from the sampler; another method's section is not pinned; a shared value outside the
    searched choices is refused, naming the key to set."""
    search = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "lora.r": [4, 8, 16],
              "lora.alpha_over_r": [1, 2, 4], "lora.lora_dropout": {"low": 0.0, "high": 0.1},
              "method": ["lora", "ia3"], "ia3.init_ia3_weights": [True, False]}  # fmt: skip
    shared = {"data": "task:dates", "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}}
    f = write(
        tmp_path / "e.yaml", {**shared, "search": search, "variants": [{"name": "current", "lr": 1e-3}]}
    )
    experiment = read_experiment(f)
    [(name, labels)] = variant_starts(experiment, parse_space(experiment))
    assert labels == {"lr": 1e-3, "lora.r": 16, "lora.alpha_over_r": 2, "lora.lora_dropout": 0.05,
                      "method": "lora"}  # fmt: skip
    g = write(tmp_path / "g.yaml", {**shared, "lora": {"r": 64, "lora_alpha": 128}, "search": search,
                                    "variants": [{"name": "current", "lr": 1e-3}]})  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"variant 'current' leaves lora.r to the shared config.*set lora.r"
    ):
        variant_starts(read_experiment(g), parse_space(read_experiment(g)))


def test_variants_must_fit_the_search_and_foreign_directories_are_refused(tmp_path, capsys):
    f = write(tmp_path / "e.yaml", {"search": {"lr": [1e-3]}, "variants": [{"name": "v", "lora": {"r": 4}}]})
    assert tune(f, "--out", tmp_path / "out") == 2
    assert "variant 'v' sets lora.r, which is not searched" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    write(tmp_path / "mine" / "notes.txt", "keep me")
    g = write(tmp_path / "g.yaml", {"search": {"lr": [1e-3]}})
    assert tune(g, "--out", tmp_path / "mine") == 2
    assert "holds other files (notes.txt) and no tune.json" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # not even a lock file


def test_a_project_with_tune_like_names_is_neither_used_nor_overwritten(tmp_path, capsys, monkeypatch):
    """Entries named like tune's (configs/, best.yaml) do not make a directory tune's: only tune.json
    does, so --overwrite cannot delete a user's configs; the working and home directories are refused."""
    proj = tmp_path / "proj"
    write((proj / "configs").mkdir(parents=True) or proj / "configs" / "prod.yaml", "lr: 1e-3\n")
    write(proj / "best.yaml", "lr: 2e-3\n")
    g = write(tmp_path / "g.yaml", {"search": {"lr": [1e-3]}})
    for extra in ([], ["--overwrite"]):
        assert tune(g, "--out", proj, *extra) == 2
        assert "holds other files (best.yaml, configs) and no tune.json" in capsys.readouterr().err
    assert (proj / "configs" / "prod.yaml").read_text() == "lr: 1e-3\n" and sorted(os.listdir(proj)) == [
        "best.yaml", "configs"]  # fmt: skip
    monkeypatch.chdir(proj / "configs")
    for out, words in ((".", "is the working directory"), ("..", "is a parent of the working directory"),
                       (Path.home(), "is the home directory")):  # fmt: skip
        assert tune(g, "--out", out) == 2
        assert words in capsys.readouterr().err
    write(tmp_path / "afile", "x")
    assert tune(g, "--out", tmp_path / "afile" / "out") == 2
    assert "is a file, so the directory cannot be made" in capsys.readouterr().err


# -- the study loop, on a stand-in trainer (milliseconds a trial) ------------------------------------------
class FakeTrainer:
    """Stands in for run_training: a validation curve made from the config (best near lr 3e-3), fed to
    the watcher as a run would write it. `interrupt_at` raises Ctrl-C during that call."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self.interrupt_at = interrupt_at

    def __call__(self, config, config_path, *, log, watch=None, threads=None):
        self.calls.append((config.output_dir, config.lr))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        final = abs(math.log10(config.lr / 3e-3)) + 0.01 * config.lora.r
        steps = config.max_steps
        for step in range(config.eval_every, steps + 1, config.eval_every):
            val = final + 3.0 * (1 - step / steps)
            if watch({"step": step, "val_loss": val}):
                return Outcome(config.output_dir, {}, None, stopped=True, reused=False)
        return Outcome(
            config.output_dir, {"best_val_loss": final, "steps": steps}, 1.0, stopped=False, reused=False
        )


@pytest.fixture
def fake(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setattr("peftkit.tune.trial.run_training", trainer)
    return trainer


def fake_experiment(tmp_path, name="e.yaml", **extra):
    data = {"max_steps": 8, "search": {"lr": {"low": 1e-5, "high": 1e-1, "log": True}, "lora.r": [4, 8, 16]}}
    return write(tmp_path / name, data | extra)


def params_of(out):
    return [r["params"] for r in json.loads((out / "trials.json").read_text())["trials"]]


def test_the_seed_fixes_the_suggestions_in_one_go_or_over_reruns(tmp_path, fake):
    f = fake_experiment(tmp_path)
    assert tune(f, "--out", tmp_path / "a", "--trials", 4, "--pruner", "none") == 0
    assert tune(f, "--out", tmp_path / "b", "--trials", 2, "--pruner", "none") == 0
    assert tune(f, "--out", tmp_path / "b", "--trials", 4, "--pruner", "none") == 0
    assert tune(f, "--out", tmp_path / "c", "--trials", 4, "--pruner", "none", "--seed", 7) == 0
    assert params_of(tmp_path / "a") == params_of(tmp_path / "b")
    assert params_of(tmp_path / "a") != params_of(tmp_path / "c")
    assert len(fake.calls) == 4 + 2 + 2 + 4  # the rerun of b trained only the two new trials


def test_an_interrupted_trial_is_retried_first_in_its_own_run_dir(tmp_path, monkeypatch, capsys):
    f, out = fake_experiment(tmp_path), tmp_path / "out"
    trainer = FakeTrainer(interrupt_at=2)
    monkeypatch.setattr("peftkit.tune.trial.run_training", trainer)
    assert tune(f, "--out", out, "--trials", 3, "--pruner", "none") == 130  # Ctrl-C's exit code
    assert "trial 1 interrupted" in capsys.readouterr().out
    assert "| 1 | interrupted |" in (out / "trials.md").read_text()  # its retry is queued, not yet run
    trainer.interrupt_at = None
    assert tune(f, "--out", out, "--trials", 3, "--pruner", "none") == 0
    rows = json.loads((out / "trials.json").read_text())["trials"]
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "complete"), (1, "interrupted"), (2, "complete"),
                                                        (3, "complete")]  # fmt: skip
    assert (
        rows[2]["retry_of"] == 1
        and rows[2]["run_dir"] == "trials/1"
        and rows[2]["params"] == rows[1]["params"]
    )
    assert [c[0].split("/")[-1] for c in trainer.calls] == ["0", "1", "1", "3"]


def test_other_experiments_are_refused_and_overwrite_removes_only_tune_files(tmp_path, fake, capsys):
    f, out = fake_experiment(tmp_path), tmp_path / "out"
    assert tune(f, "--out", out, "--trials", 1) == 0
    write(out / "notes.txt", "mine")
    (out / "tune.json").unlink()  # a run from before tune.json: its study.db makes it tune's
    g = fake_experiment(tmp_path, "g.yaml", max_steps=12)
    assert tune(g, "--out", out, "--trials", 2) == 2
    assert "differs in shared key max_steps" in capsys.readouterr().err
    assert tune(f, "--out", out, "--trials", 2, "--objective", "score") == 2
    assert "differs in objective" in capsys.readouterr().err
    assert tune(g, "--out", out, "--trials", 1, "--overwrite") == 0
    assert "removed the earlier tune run's" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and load_config(out / "best.yaml").max_steps == 12
    assert json.loads((out / "tune.json").read_text())["kind"] == "peftkit tune"


@pytest.mark.parametrize("pruner", ["median", "halving"])
def test_pruners_stop_a_trial_whose_curve_is_worse(tmp_path, fake, pruner):
    variants = [{"name": n, "lr": lr} for n, lr in (("good", 3e-3), ("ok", 1e-3), ("bad", 1e-5))]
    f = fake_experiment(tmp_path, search={"lr": {"low": 1e-5, "high": 1e-1, "log": True}}, variants=variants)
    assert tune(f, "--out", tmp_path / "out", "--trials", 3, "--pruner", pruner) == 0
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"]
    assert [(r["variant"], r["state"]) for r in rows] == [
        ("good", "complete"),
        ("ok", "complete"),
        ("bad", "pruned"),
    ]
    assert rows[2]["steps"] == 2  # stopped at its first validation


def test_runs_are_placed_by_absolute_path_and_output_dir_is_refused(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = fake_experiment(tmp_path)
    with pytest.raises(ConfigError, match="compare and tune place every run themselves"):
        read_experiment(f, {"output_dir": "elsewhere"})  # on the command line it is --out's other name
    assert tune(f, "--output_dir", "out", "--trials", 1) == 0  # relative: a rerun from elsewhere resumes
    assert fake.calls[0][0] == str(tmp_path / "out" / "trials" / "0")
    assert load_config(tmp_path / "out" / "best.yaml").output_dir == str(tmp_path / "out" / "best")


def test_a_pruned_trial_names_the_step_of_the_validation_that_pruned_it():
    from peftkit.tune.trial import Watch

    class Trial:
        def report(self, value, step):
            pass

        def should_prune(self):
            return True

    watch = Watch(Trial(), 1.0, gate=True)
    assert not watch({"step": 1, "loss": 3.0})
    assert watch({"step": 2, "val_loss": 2.0})
    watch({"step": 3, "loss": 1.0})  # the run trains on a little before it is stopped
    assert (watch.steps, watch.pruned_at) == (3, 2)


def test_halving_rungs_are_at_multiples_of_eval_every(tmp_path, fake):
    import optuna

    f = fake_experiment(tmp_path, max_steps=12, eval_every=4)  # validations at steps 4, 8, 12
    assert tune(f, "--out", tmp_path / "out", "--trials", 1, "--pruner", "halving") == 0
    study = optuna.load_study(study_name="peftkit-tune", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    trial = study.trials[0]
    rungs = {k: v for k, v in trial.system_attrs.items() if k.startswith("completed_rung_")}
    assert rungs == {
        "completed_rung_0": trial.intermediate_values[4],
        "completed_rung_1": trial.intermediate_values[12],
    }


# -- end to end on the tiny model -------------------------------------------------------------------------
def tiny_experiment(tmp_path, tiny_model_dir, **extra):
    data = {"base": str(tiny_model_dir), "data": "task:dates", "max_examples": 40, "val_fraction": 0.1,
            "max_steps": 8, "batch_size": 4, "warmup_ratio": 0.0}  # fmt: skip
    return write(tmp_path / "e.yaml", data | extra)


def test_tune_end_to_end_prunes_resumes_and_writes_a_trainable_best_yaml(tmp_path, tiny_model_dir, capsys):
    variants = [{"name": "good-a", "lr": 3e-2, "lora": {"r": 4}}, {"name": "good-b", "lr": 2e-2, "lora": {"r": 2}},
                {"name": "terrible", "lr": 1e-6, "lora": {"r": 4}}]  # fmt: skip
    search = {"lr": {"low": 1e-6, "high": 3e-2, "log": True}, "lora.r": [2, 4]}
    f, out = tiny_experiment(tmp_path, tiny_model_dir, search=search, variants=variants), tmp_path / "out"
    assert tune(f, "--out", out, "--trials", 3) == 0
    printed = capsys.readouterr().out
    assert "validate every 2 steps" in printed and "trial 2 [3/3] pruned" in printed
    assert (out / "study.db").is_file()
    summary = json.loads((out / "trials.json").read_text())
    rows = summary["trials"]
    assert [(r["variant"], r["state"]) for r in rows] == [("good-a", "complete"), ("good-b", "complete"),
                                                          ("terrible", "pruned")]  # fmt: skip
    complete = [r["objective"] for r in rows if r["state"] == "complete"]
    assert all(math.isfinite(v) for v in complete) and summary["best"]["value"] == min(complete)
    assert all(r["steps"] == 8 and r["seconds"] > 0 for r in rows[:2])
    table = list(csv.DictReader((out / "trials.csv").open()))
    assert [row["state"] for row in table] == ["complete", "complete", "pruned"]
    assert float(table[0]["objective"]) == rows[0]["objective"] and table[0]["lora.r"] == "4"
    md = (out / "trials.md").read_text()
    assert md.count("\n| ") == 4 and "Parameter importances (PED-ANOVA)" in md
    assert "From 2 complete trials only: read with care." in md  # importances from 2 trials are noise
    assert all((out / p).read_bytes().startswith(PNG) for p in ("objective.png", "importance.png"))
    finished = {n: (out / f"trials/{n}/metrics.jsonl").stat().st_mtime_ns for n in range(3)}

    assert tune(f, "--out", out, "--trials", 4) == 0  # resumed: exactly one new trial
    printed = capsys.readouterr().out
    assert [line.split(" [")[0] for line in printed.splitlines() if line.startswith("trial ")] == ["trial 3"]
    assert {n: (out / f"trials/{n}/metrics.jsonl").stat().st_mtime_ns for n in range(3)} == finished
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 4

    best = load_config(out / "best.yaml")
    assert best.output_dir == str(out / "best") and best.eval_every == 2 and best.progress
    assert best.lr == rows[summary["best"]["trial"]]["params"]["lr"]
    assert main(["train", str(out / "best.yaml")]) == 0
    assert json.loads((out / "best" / "summary.json").read_text())["steps"] == 8


def test_objective_score_uses_the_validation_examples(tmp_path, tiny_model_dir, capsys):
    f = tiny_experiment(tmp_path, tiny_model_dir, search={"lr": [3e-2]}, evaluate={"examples": 3})
    assert tune(f, "--out", tmp_path / "out", "--trials", 1, "--objective", "score", "--pruner", "none") == 0
    row = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"][0]
    assert row["state"] == "complete" and 0 <= row["score"] <= 1 and row["objective"] == row["score"]
    g = tiny_experiment(tmp_path, tiny_model_dir, search={"lr": [3e-2]}, evaluate={"split": "test"})
    assert tune(g, "--out", tmp_path / "o2", "--objective", "score") == 2
    assert "never the test split" in capsys.readouterr().err


@pytest.mark.parametrize(
    "evaluate, objective, outcome",
    [
        ({"metric": "auto", "max_new_tokens": 0, "batch_size": 4}, "score", ""),  # compare's defaults
        ({"data": "task:sentiment", "window": 64}, "score", "evaluate: data, window are compare's keys"),
        ({"examples": 5}, "val_loss", "evaluate: not used by --objective val_loss"),
        ({"exampels": 3}, "val_loss", "unknown key 'exampels' (did you mean 'examples'?)"),
        ({"split": "validation"}, "score", "never the test split"),
        ({"metric": "nope"}, "score", "evaluate.metric 'nope'"),
        ({"examples": 0}, "score", "evaluate.examples must be at least 1"),
    ],
)
def test_tune_reads_evaluate_by_compares_schema(tmp_path, evaluate, objective, outcome):
    from peftkit.tune.objective import check_evaluation

    config = read_experiment(None, {"data": "task:dates", "val_fraction": 0.1}).config()
    said: list[str] = []
    if outcome.startswith("evaluate: ") or not outcome:
        check_evaluation(evaluate, config, objective, said.append)
        assert len(said) == bool(outcome) and outcome in "".join(said)
    else:
        with pytest.raises(ConfigError, match=re.escape(outcome)):
            check_evaluation(evaluate, config, objective, said.append)


def test_sigterm_stops_tune_as_ctrl_c_does_and_the_same_command_resumes_the_trial(tmp_path, tiny_model_dir):
    """`kill -TERM` of tune while its first trial trains: the trial's run is told to stop and saves a
    checkpoint, tune waits for it, queues the trial again, starts no other, says what was left and
    exits 143. The same command then retries that trial from its checkpoint, in its run directory."""
    import signal
    import subprocess
    import sys
    import time

    f = tiny_experiment(tmp_path, tiny_model_dir, search={"lr": [3e-2]}, max_steps=60)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "peftkit", "tune", str(f), "--out", str(out), "--trials", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = out / "trials" / "0" / "metrics.jsonl"
    try:
        while proc.poll() is None and not (metrics.is_file() and b"\n" in metrics.read_bytes()):
            time.sleep(0.02)  # until the trial's run has taken a step: the signal lands mid-run
        proc.send_signal(signal.SIGTERM)
        printed, _ = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, printed
    assert "trial 0 interrupted" in printed
    assert "stopped by SIGTERM: 0 trial(s) finished in this run, 1 stopped" in printed
    assert "1 not started. Run the same command again" in printed, printed
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["0.log"]  # no other trial started
    assert any((out / "trials" / "0" / "checkpoints").iterdir())
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]

    done = subprocess.run([*command[:-1], "1"], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((out / "trials.json").read_text())["trials"]
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "interrupted"), (1, "complete")]
    assert rows[1]["run_dir"] == "trials/0" and rows[1]["steps"] == 60
    assert f"resuming at step {stopped_at}" in (out / "logs" / "1.log").read_text()


# A hang guard only, sized for a slow, loaded machine: no test waits on how fast the machine is.
HANG_GUARD_S = 900


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/tune_*.yaml")), ids=lambda p: p.name)
def test_shipped_tune_examples_parse(path):
    experiment = read_experiment(path)
    params = parse_space(experiment)
    assert params and variant_starts(experiment, params) is not None


def test_objective_plot_goes_log_scale_when_one_trial_dwarfs_the_rest(tmp_path):
    """A diverged trial (val_loss 0.96 beside 0.004) would flatten every other point onto the axis."""
    import matplotlib.pyplot as plt

    from peftkit.tune import report

    rows = [
        {"trial": 0, "objective": 0.004, "state": "complete", "val_loss": 0.004},
        {"trial": 1, "objective": None, "state": "pruned", "val_loss": 0.96},
    ]
    scales = []
    real_save = report._save
    report._save = lambda plt_, fig, png: (scales.append(fig.axes[0].get_yscale()), real_save(plt_, fig, png))
    try:
        report.plot_objective(rows, "val_loss", tmp_path / "a.png")
        report.plot_objective([{**rows[1], "val_loss": 0.005}, rows[0]], "val_loss", tmp_path / "b.png")
    finally:
        report._save = real_save
        plt.close("all")
    assert scales == ["log", "linear"]
