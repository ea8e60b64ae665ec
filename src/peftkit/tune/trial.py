"""One trial: sample, train in a child process while its validation curve feeds the pruner, score, tell.

The trial's facts go into its Optuna user attributes, which the report reads: run_dir (relative to
OUT), steps (optimizer steps it ran), val_loss (the best it reached), pruned_at (the step of the
validation that pruned it), score (objective score), seconds, error (a failed run's first line;
its log is OUT/logs/N.log), variant and retry_of.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PeftkitError
from ..experiment import run_training
from ..train.report import read_metrics
from .objective import validation_score
from .space import resolve, suggest

TRIAL_ONLY = {"progress": False, "tensorboard": False}  # trials run quietly; best.yaml keeps the user's


class Watch:
    """Fed each metrics record of a trial's run; reports validation losses to the trial and returns
    True (stop the run) once the pruner prunes it. Before `gate` complete trials exist, the pruner is
    still asked but not obeyed: successive halving records each rung's value when a trial reaches that
    rung (eval_every x 1, 3, 9, ... steps), so the first trials' values count at every rung too."""

    def __init__(self, trial: Any, sign: float, gate: bool) -> None:
        self.trial, self.sign, self.gate = trial, sign, gate
        self.steps, self.best_val, self.pruned = 0, math.inf, False
        self.pruned_at: int | None = None  # the step of the validation that pruned the trial
        self.reported: set[int] = set()

    def __call__(self, record: dict[str, Any]) -> bool:
        step = record.get("step")
        if isinstance(step, int):
            self.steps = max(self.steps, step)
        val = record.get("val_loss")
        if (
            self.pruned
            or not isinstance(val, (int, float))
            or not math.isfinite(val)
            or step in self.reported
        ):
            return False
        self.reported.add(step)
        self.best_val = min(self.best_val, val)
        self.trial.report(self.sign * val, step)  # optuna compares in the study's direction
        self.pruned = self.trial.should_prune() and self.gate
        self.pruned_at = step if self.pruned else None
        return self.pruned


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: fixed by (seed, number), whatever ran before in this process."""
    return int.from_bytes(hashlib.sha256(f"peftkit-tune:{seed}:{number}".encode()).digest()[:4], "big")


def run_trial(run: Any, target: int | None) -> Any:
    """Ask, train, tell: one trial of `run` (a study._Run). Returns the finished optuna FrozenTrial."""
    import optuna
    from optuna.trial import TrialState

    trials = run.study.get_trials(deepcopy=False)
    waiting = [t.number for t in trials if t.state == TrialState.WAITING]
    number = min(waiting) if waiting else len(trials)  # ask() takes the first queued trial
    run.study.sampler = optuna.samplers.TPESampler(
        seed=trial_seed(run.seed, number), multivariate=True, group=True
    )
    trial = run.study.ask()
    started = time.monotonic()
    try:
        chosen = suggest(trial, run.params, run.experiment.config().method)
        run_dir = trial.user_attrs.get("run_dir") or f"trials/{trial.number}"
        trial.set_user_attr("run_dir", run_dir)
        state, value = _train(run, trial, chosen, Path(run.out) / run_dir)
    except KeyboardInterrupt:
        interrupt(run.study, trial.number, trial.params, trial.user_attrs)
        run.stopped_trial = trial.number
        run.log(f"trial {trial.number} interrupted; rerun the same command to retry it and go on")
        raise
    except PeftkitError as e:  # RunFailed (its log's tail), a diverged run, a config that cannot be built
        state, value = TrialState.FAIL, None
        trial.set_user_attr("error", _one_line(str(e)))
    trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
    frozen = run.study.tell(trial, value, state)
    run.log(progress_line(run, frozen, target))
    return frozen


def _train(run: Any, trial: Any, chosen: dict[str, Any], out: Path) -> tuple[Any, float | None]:
    """(state, objective value) of the trial after training `chosen` into `out` (and scoring it)."""
    from optuna.trial import TrialState

    exp, n = run.experiment, trial.number
    config = exp.config({**run.fixed, **resolve(chosen, exp), **TRIAL_ONLY}, output_dir=str(out))
    complete = len(run.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    watch = Watch(
        trial, -1.0 if run.settings.objective == "score" else 1.0, complete >= run.settings.pruner_startup
    )
    log = Path(run.out) / "logs" / f"{n}.log"
    outcome = run_training(config, Path(run.out) / "configs" / f"{n}.yaml", log=log, watch=watch,
                           threads=run.settings.threads)  # fmt: skip
    if outcome.reused:  # a retried trial whose run had finished: its curve, as if watched
        for record in read_metrics(out / "metrics.jsonl"):
            watch(record)
    trial.set_user_attr("steps", watch.steps or outcome.summary.get("steps", 0))
    if math.isfinite(watch.best_val):
        trial.set_user_attr("val_loss", watch.best_val)
    if watch.pruned or outcome.stopped:
        if watch.pruned_at is not None:
            trial.set_user_attr("pruned_at", watch.pruned_at)
        return TrialState.PRUNED, None
    best_val = outcome.summary.get("best_val_loss")
    if best_val is None:
        raise ConfigError(f"trial {n} ran no validation, so it has no validation loss (see {log})")
    trial.set_user_attr("val_loss", best_val)
    if run.settings.objective != "score":
        return TrialState.COMPLETE, best_val
    score = validation_score(config, outcome.summary, exp.evaluation)
    trial.set_user_attr("score", score)
    return TrialState.COMPLETE, score


def _one_line(message: str) -> str:
    """A failure in one line: its first line and, for a run's log tail, the log's last line (the error)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "") if lines else "(no message)"
    return text[:400]


def progress_line(run: Any, t: Any, target: int | None) -> str:
    """One line per trial: its verdict, objective, parameters, steps and time, and the best so far."""
    from .report import format_params

    done = len(finished(run.study.get_trials(deepcopy=False)))
    of = f"{done}/{target}" if target else f"{done}"
    a = t.user_attrs
    if t.state.name == "COMPLETE":
        verdict = f"{run.settings.objective} {t.value:.4g}"
    elif t.state.name == "PRUNED":
        verdict = f"pruned at step {a.get('pruned_at', a.get('steps'))} (val_loss {a.get('val_loss', math.nan):.4g})"
    else:
        verdict = f"failed: {a.get('error', '?')}"
    line = f"trial {t.number} [{of}] {verdict}  {format_params(t.params)}  ({a.get('steps', 0)} steps, {a.get('seconds', 0):.0f} s)"
    try:
        best = run.study.best_trial
        line += f"  best: trial {best.number}, {best.value:.4g}"
    except ValueError:  # no complete trial yet
        pass
    return line


def interrupt(study: Any, number: int, params: dict[str, Any], attrs: dict[str, Any]) -> None:
    """Mark an interrupted trial failed and queue its parameters again, in the same run directory."""
    from optuna.trial import TrialState

    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    keep = {k: attrs[k] for k in ("run_dir", "variant") if k in attrs}
    study.enqueue_trial(params, user_attrs={**keep, "retry_of": number})


def finished(trials: list[Any]) -> list[Any]:
    """Trials with a verdict (complete, pruned, failed); an interrupted one that is retried is not one."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in trials if t.state in done and t.number not in retried]
