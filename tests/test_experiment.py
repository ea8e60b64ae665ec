"""The experiment file (shared keys + variants/search/evaluate) and the one-run-per-process runner."""

from __future__ import annotations

import json

import pytest

from peftkit.errors import ConfigError
from peftkit.experiment import read_experiment, run_training
from peftkit.experiment.config import expand_dotted

pytestmark = pytest.mark.usefixtures("one_thread_per_training_child")


def write(path, text):
    path.write_text(text)
    return path


def test_variants_override_shared_keys_section_by_section(tmp_path):
    f = write(
        tmp_path / "e.yaml",
        """
data: task:dates
lr: 1e-3
lora: {r: 16, lora_alpha: 32}
variants:
  - {name: small, lora: {r: 4}}
  - {method: ia3, lr: 3e-3}
  - {"lora.r": 64}
evaluate: {examples: 10}
""",
    )
    e = read_experiment(f)
    assert [v.name for v in e.variants] == ["small", "method=ia3_lr=3e-3", "lora.r=64"]
    small = e.config(e.variants[0].overrides, output_dir=str(tmp_path / "o"))
    assert (small.lora.r, small.lora.lora_alpha, small.lr) == (4, 32, 1e-3)  # alpha kept from shared
    ia3 = e.config(e.variants[1].overrides)
    assert (ia3.method, ia3.lr) == ("ia3", 3e-3)
    assert e.config(e.variants[2].overrides).lora.r == 64
    assert e.evaluation == {"examples": 10}
    assert e.search is None


@pytest.mark.parametrize(
    "body, words",
    [
        ("variants: {a: 1}", "variants must be a list"),
        ("variants: [{lora: {r: 0}}]", "variant 'lora.r=0'"),
        ("variants: [{lr: 1}, {lr: 1}]", "two variants are named 'lr=1'"),
        ("variants: [{name: 'a b'}]", "name 'a b' must be"),
        ("variants: [{output_dir: x}]", "cannot change"),
        ("variants: [{lora_rank: 8}]", "lora_rank"),
        ("search: [1, 2]", "search must be a mapping"),
        ("lr: abc", "lr"),
    ],
)
def test_bad_experiment_files_are_refused_by_name(tmp_path, body, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        read_experiment(write(tmp_path / "e.yaml", body))


def test_dotted_and_nested_keys_merge():
    assert expand_dotted({"lora.r": 8, "lora": {"lora_alpha": 4}, "lr": 1}) == {
        "lora": {"r": 8, "lora_alpha": 4},
        "lr": 1,
    }


def test_a_run_trains_in_its_own_process_is_watched_and_reused(tiny_model_dir, tmp_path):
    e = read_experiment(None, {"base": str(tiny_model_dir), "data": "task:dates", "max_examples": 40})
    config = e.config(
        {"max_steps": 4, "batch_size": 4, "eval_every": 2, "tensorboard": False, "progress": False},
        output_dir=str(tmp_path / "runs" / "a"),
    )
    seen = []
    outcome = run_training(config, tmp_path / "configs" / "a.yaml", log=tmp_path / "a.log", watch=seen.append)
    assert not outcome.stopped and not outcome.reused
    assert outcome.summary["steps"] == 4 and outcome.peak_rss_mb > 50  # a torch process: tens of MB at least
    assert [r["val_loss"] for r in seen if "val_loss" in r] == [
        r["val_loss"]
        for r in map(json.loads, (tmp_path / "runs/a/metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    ] and len([r for r in seen if "val_loss" in r]) == 2
    again = run_training(config, tmp_path / "configs" / "a.yaml", log=tmp_path / "a.log")
    assert again.reused and again.summary == outcome.summary and again.peak_rss_mb == outcome.peak_rss_mb
    # The watcher stops a run: a changed config retrains (overwriting its own old run), and stops at once.
    longer = config.replace(max_steps=400)
    stopped = run_training(longer, tmp_path / "configs" / "a.yaml", log=tmp_path / "a.log",
                           watch=lambda r: r.get("step", 0) >= 2)  # fmt: skip
    assert stopped.stopped and stopped.summary == {}


SCRIPT = """
import sys
from pathlib import Path
from peftkit.experiment import read_experiment, run_training
from peftkit.experiment.stopping import exit_status
out = Path(sys.argv[2])
e = read_experiment(None, {"base": sys.argv[1], "data": "task:dates", "max_examples": 40})
config = e.config({"max_steps": int(sys.argv[3]), "batch_size": 4, "checkpoint_every": 0, "eval_every": 0,
                   "tensorboard": False, "progress": False}, output_dir=str(out / "run"))
try:
    outcome = run_training(config, out / "run.yaml", log=out / "run.log")
except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the child checkpointed first
    sys.exit(exit_status(e))
print("steps", outcome.summary["steps"], "reused", outcome.reused)
"""
# A hang guard only, sized for a slow, loaded machine: no test waits on how fast the machine is.
HANG_GUARD_S = 900


def _run_script(tmp_path, tiny_model_dir, steps, **popen):
    """The watcher script above, started as its own process group (as a terminal's job)."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), str(tiny_model_dir), str(tmp_path), str(steps)]
    # SIGINT as at a terminal: a shell's background job (a CI runner's `cmd &`) starts with it ignored,
    # and an ignored signal stays ignored across exec.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(args, start_new_session=True, preexec_fn=default_sigint, **popen)
    return proc, args


def _wait_for_steps(proc, metrics, steps=1):
    """Until the run has logged `steps` steps (or its watcher exited): the signal then lands mid-run."""
    import time

    while proc.poll() is None and _lines(metrics) < steps:
        time.sleep(0.02)
    assert proc.poll() is None, "the watcher exited before the run took a step"


def _lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def test_ctrl_c_lets_the_run_checkpoint_and_the_rerun_resumes_it(tiny_model_dir, tmp_path):
    """Ctrl-C at the terminal reaches the watcher, which passes it on to the child (in a session of its
    own): the child saves a checkpoint (the watcher waits for it instead of aborting it), the watcher
    exits 130, and running the same config again resumes from that step and finishes."""
    import os
    import signal
    import subprocess

    proc, args = _run_script(tmp_path, tiny_model_dir, 30, stderr=subprocess.PIPE)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for_steps(proc, metrics)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, err
    assert any((tmp_path / "run" / "checkpoints").iterdir()), "the child saved no checkpoint"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["interrupted"] is True
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 1 <= stopped_at < 30
    # The same config again resumes from there, not from scratch, and finishes.
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert rerun.returncode == 0, rerun.stderr
    assert "steps 30 reused False" in rerun.stdout
    assert f"resuming at step {stopped_at}" in (tmp_path / "run.log").read_text()


def test_evaluate_auto_metric_and_answer_budget_come_from_the_scored_task(tmp_path):
    from peftkit.data.tasks import get_task
    from peftkit.experiment.evaluation import max_new_tokens_for, metric_for, read_evaluation

    assert read_evaluation({}).examples is None  # each command has its own default
    dates = get_task("dates")
    assert metric_for("auto", "task:dates") == dates.metric and metric_for("auto", "x.jsonl") == "exact_match"
    assert metric_for("token_f1", "task:dates") == "token_f1"
    assert max_new_tokens_for(0, "task:dates:test", None, []) == dates.max_new_tokens
    assert max_new_tokens_for(7, "task:dates", None, []) == 7
    with pytest.raises(ConfigError, match="unknown key 'exampels'"):
        read_evaluation({"exampels": 3})


def _children(pid):
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGTERM-to-all", "SIGKILL"])  # SIGHUP: test_compare's
def test_killing_the_watcher_stops_its_training_child(tiny_model_dir, tmp_path, how):
    """A killed compare/tune must not leave its trainer running (a rerun would start a second one in
    the same run directory). SIGTERM and SIGHUP are Ctrl-C: the child is told to stop, saves a
    checkpoint, and the watcher waits for it and exits 128 + the signal; on SIGKILL the kernel stops
    the child (PR_SET_PDEATHSIG). SIGTERM-to-all is a control group's kill (systemd, Slurm): the child
    gets it directly and passed on, and still stops once, with its checkpoint."""
    import os
    import signal
    import subprocess
    import time

    proc, _ = _run_script(
        tmp_path, tiny_model_dir, 100000, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl")
    (child,) = _children(proc.pid)
    sig = getattr(signal, how.split("-")[0])
    try:
        proc.send_signal(sig)
        if how == "SIGTERM-to-all":
            os.kill(child, sig)
        assert proc.wait(timeout=HANG_GUARD_S) == (-9 if how == "SIGKILL" else 128 + sig)
        if how != "SIGKILL":  # the watcher waited for the child, which checkpointed
            assert _gone(child)
            assert any((tmp_path / "run" / "checkpoints").iterdir())
            log = (tmp_path / "run.log").read_text()
            assert "stopping after this step" in log and "aborted" not in log, log
        guard = time.monotonic() + HANG_GUARD_S
        while not _gone(child) and time.monotonic() < guard:  # the kernel's SIGTERM is on its way
            time.sleep(0.02)
        assert _gone(child), "the training child outlived its watcher"
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
