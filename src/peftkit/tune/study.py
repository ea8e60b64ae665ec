"""The search loop: Optuna's ask/tell around one `peftkit train` child process per trial.

Each trial samples its training keys from the space (`space.suggest`), trains in OUT/trials/N through
`experiment.run_training`, and reports every validation loss to Optuna as the run writes it; when the
pruner says so, the child is stopped. The objective is the run's best validation loss (minimised) or
its task score on the validation examples (`objective.validation_score`, maximised).

The study lives in OUT/study.db, so a rerun continues it: `trials` is the total number of finished
trials (complete, pruned or failed), not the number to add. A trial left running by a crash or Ctrl-C
is marked interrupted and queued again, in its own run directory (resuming its checkpoint if it has
one): it runs next, after any of the file's variants still queued (Optuna runs queued trials in order).
Each trial's sampler is seeded from (seed, trial number), so the same seed and the same results give
the same suggestions, whether the trials ran in one go or over several reruns.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PeftkitError
from ..experiment import Experiment, Variant
from ..experiment.config import flatten
from ..experiment.stopping import interrupted_line, stop_signals
from .objective import check_evaluation
from .outdir import STUDY, STUDY_NAME, claim, locked, storage_url, take
from .space import ALPHA_OVER_R, Param, parse_space
from .trial import finished, interrupt, run_trial

DEFAULT_TRIALS = 20  # the budget when neither trials nor timeout is given
MAX_FAILURES = 3  # this many failed trials in a row stop the search (a setup problem, not bad luck)


class TuneFailed(PeftkitError):
    """The search cannot go on (trials keep failing); the message names the last failure and its log."""


@dataclass(frozen=True)
class Settings:
    objective: str = "val_loss"  # "val_loss" (minimise the best validation loss) or "score" (maximise)
    pruner: str = "median"  # "median", "halving" or "none"
    trials: int | None = None  # finished trials the study should hold (None: DEFAULT_TRIALS if no timeout)
    timeout: float | None = None  # seconds after which no new trial starts (this invocation)
    seed: int | None = None  # the sampler's seed (None: the config's seed)
    pruner_startup: int = 2  # complete trials before any trial is pruned
    threads: int | None = None  # OMP_NUM_THREADS of each training process
    variants: bool = True  # the file's variants are the first trials
    overwrite: bool = False  # start afresh in a directory holding an earlier tune run


@dataclass
class _Run:
    """What one invocation of tune works with."""

    experiment: Experiment
    params: list[Param]
    settings: Settings
    out: Path
    study: Any  # optuna.Study
    fixed: dict[str, Any]  # training keys every trial (and best.yaml) gets before its sampled ones
    seed: int
    log: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    stopped_trial: int | None = None  # the trial a stop signal interrupted (queued again)


@dataclass
class TuneResult:
    study: Any  # optuna.Study
    new_trials: int  # trials run by this invocation
    best: Any | None  # the best complete trial (optuna.trial.FrozenTrial), None if none completed
    best_yaml: Path | None


def tune_experiment(
    experiment: Experiment, out: Path, settings: Settings, log: Callable[[str], None] = print
) -> TuneResult:
    """Search the experiment's space into `out` (see the module docstring); returns the study and its best."""
    import optuna

    # Absolute: the trials' configs and best.yaml name their output_dir, and a rerun from another
    # working directory must find (and resume) the same runs.
    out = Path(out).expanduser().absolute()

    from .report import write_best, write_report

    params = parse_space(experiment)
    base = experiment.config()
    if base.val_data is None and base.val_fraction == 0:
        raise ConfigError("tune needs validation examples: set val_fraction > 0 (e.g. 0.05) or val_data")
    check_evaluation(experiment.evaluation, base, settings.objective, log)
    starts = variant_starts(experiment, params) if settings.variants else []
    fixed = trial_keys(experiment, settings, log)
    claim(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    with locked(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if removed := take(out, experiment.path, settings.overwrite):
            log(f"--overwrite: removed the earlier tune run's {', '.join(removed)} from {out}")
        every = fixed.get("eval_every", base.eval_every)  # the first validation step (0: per epoch)
        study, created = open_study(out, fingerprint(experiment, params, settings.objective), settings, every)
        for name, labels in starts if created else ():
            study.enqueue_trial(labels, user_attrs={"variant": name})
        run = _Run(experiment, params, settings, out, study, fixed, _seed(settings, base.seed), log)
        retry_unfinished(study, log)
        new = 0
        try:
            with stop_signals():  # SIGTERM and SIGHUP stop tune as Ctrl-C does
                new = _loop(run)
        finally:
            best = write_report(out, study, params, settings.objective)
            best_yaml = write_best(run, best) if best is not None else None
    return TuneResult(study, new, best, best_yaml)


def _seed(settings: Settings, config_seed: int) -> int:
    return config_seed if settings.seed is None else settings.seed


def trial_keys(experiment: Experiment, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Keys set for every trial: pruning needs a validation curve, so eval_every 0 with max_steps
    becomes a quarter of max_steps (said once)."""
    base = experiment.config()
    if base.eval_every == 0 and base.max_steps:
        every = max(1, base.max_steps // 4)
        log(
            f"eval_every is 0: trials validate every {every} steps (a quarter of max_steps) to be pruned early"
        )
        return {"eval_every": every}
    if base.eval_every == 0 and settings.pruner != "none":
        log("eval_every is 0 and max_steps unset: trials validate once per epoch, so pruning acts per epoch")
    return {}


def fingerprint(experiment: Experiment, params: list[Param], objective: str) -> dict[str, Any]:
    """What makes two tune runs the same study: the shared keys, the space, the objective, evaluate."""
    data = {"shared": experiment.shared, "search": [asdict(p) for p in params], "objective": objective,
            "evaluate": experiment.evaluation if objective == "score" else {}}  # fmt: skip
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def open_study(out: Path, fp: dict[str, Any], settings: Settings, eval_every: int) -> tuple[Any, bool]:
    """(the study in out/study.db, whether it was created now). A study of another experiment is refused."""
    import optuna

    url, existed = storage_url(out), (out / STUDY).is_file()
    if existed:
        try:
            old = optuna.load_study(study_name=STUDY_NAME, storage=url).user_attrs
        except Exception as e:  # not an Optuna database, or none of ours in it
            raise ConfigError(
                f"{out / STUDY} is not a peftkit tune study ({str(e)[:200]}); choose another --out"
            ) from None
        if old.get("experiment_hash") != _hash(fp):
            raise ConfigError(
                f"{out} holds a tune study of another experiment (it differs in {_differences(old.get('experiment'), fp)});"
                " rerun with the same file and objective to continue it, --overwrite to start afresh, or choose another --out"
            )
    direction = "maximize" if settings.objective == "score" else "minimize"
    study = optuna.create_study(storage=url, study_name=STUDY_NAME, direction=direction,
                                pruner=make_pruner(settings.pruner, eval_every), load_if_exists=True)  # fmt: skip
    if not existed:
        study.set_user_attr("experiment_hash", _hash(fp))
        study.set_user_attr("experiment", fp)
    return study, not existed


def _differences(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "what it was made from"
    keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    shared = sorted(
        k
        for k in {*old.get("shared", {}), *new["shared"]}
        if old.get("shared", {}).get(k) != new["shared"].get(k)
    )
    return (
        ", ".join([f"shared key {k}" for k in shared] + [k for k in keys if k != "shared"]) or "its settings"
    )


def make_pruner(name: str, eval_every: int) -> Any:
    """Median: stop a trial whose validation loss is worse than the median of earlier trials at that step.
    Halving: successive halving with rungs at eval_every x 1, 3, 9, ... steps (the trials' validation
    steps), keeping the best third at each rung; with eval_every 0 (once per epoch) Optuna's own
    estimate from the first complete trial."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every or "auto", reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; valid: median, halving, none")


def variant_starts(experiment: Experiment, params: list[Param]) -> list[tuple[str, dict[str, Any]]]:
    """(name, optuna params) of each variant, the study's first trials; a variant may set only searched
    keys (lora_alpha counts as alpha_over_r when that is searched), each within its range."""
    by_key = {p.key: p for p in params}
    starts = []
    for v in experiment.variants:
        flat = flatten(v.overrides)
        for key in [k for k in flat if k.endswith(".lora_alpha")]:
            section = key.split(".")[0]
            if f"{section}.{ALPHA_OVER_R}" in by_key:
                r = flat.get(f"{section}.r", getattr(experiment.config(), section).r)
                flat[f"{section}.{ALPHA_OVER_R}"] = flat.pop(key) / r
        labels = {}
        for key, value in flat.items():
            if key not in by_key:
                raise ConfigError(
                    f"variant {v.name!r} sets {key}, which is not searched: tune runs the variants as its first "
                    f"trials, so they may set only searched keys ({', '.join(by_key)}); or use --no-variants"
                )
            try:
                labels[key] = by_key[key].label_of(value)
            except ConfigError as e:
                raise ConfigError(f"variant {v.name!r}: {e}") from None
        labels.update(_unset_searched_keys(experiment, v, params, labels))
        starts.append((v.name, labels))
    return starts


def _unset_searched_keys(
    experiment: Experiment, v: Variant, params: list[Param], labels: dict[str, Any]
) -> dict[str, Any]:
    """The searched keys a variant leaves out, at the shared config's values: a variant is that config
    (optuna would otherwise sample them, and `{name: current, lr: 1e-3}` would not be the current run)."""
    config = experiment.config(v.overrides)
    out = {}
    for p in params:
        if p.key in labels or (p.section is not None and p.section != config.method):
            continue
        *parts, leaf = p.key.split(".")
        node = config
        for part in parts:
            node = getattr(node, part)
        value = node.lora_alpha / node.r if leaf == ALPHA_OVER_R else getattr(node, leaf)
        try:
            out[p.key] = p.label_of(value)
        except ConfigError as e:
            raise ConfigError(
                f"variant {v.name!r} leaves {p.key} to the shared config, whose value is not searched ({e}); "
                f"set {p.key} in the variant"
            ) from None
    return out


def retry_unfinished(study: Any, log: Callable[[str], None]) -> None:
    """Trials still marked running (this process holds the directory's lock, so none really is) were
    interrupted: mark them failed and queue their parameters again (after any queued variants)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        interrupt(study, t.number, t.params, t.user_attrs)
        log(
            f"trial {t.number} was interrupted; it is queued again (in {t.user_attrs.get('run_dir', 'a new run')})"
        )


def _loop(run: _Run) -> int:
    """Run trials until the budget is spent; returns how many ran."""
    from optuna.trial import TrialState

    s = run.settings
    target = s.trials if s.trials is not None else (DEFAULT_TRIALS if s.timeout is None else None)
    new = failures = 0
    while True:
        done = len(finished(run.study.get_trials(deepcopy=False)))
        if target is not None and done >= target:
            break
        if s.timeout is not None and time.monotonic() - run.started >= s.timeout:
            run.log(f"timeout: {s.timeout:g} s passed, no new trial starts ({done} trials finished)")
            break
        try:
            frozen = run_trial(run, target)
        except KeyboardInterrupt as e:  # the running trial (if any) checkpointed and is queued again
            run.log(_stopped_line(e, run, new, target))
            raise
        new += 1
        failures = failures + 1 if frozen.state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES:
            raise TuneFailed(
                f"{MAX_FAILURES} trials in a row failed; the last: {frozen.user_attrs.get('error')}"
            )
    return new


def _stopped_line(e: KeyboardInterrupt, run: _Run, new: int, target: int | None) -> str:
    """What a stop signal left: trials finished by this invocation, the one stopped, those not started."""
    stopped = int(run.stopped_trial is not None)
    done = len(finished(run.study.get_trials(deepcopy=False)))
    left = f"{max(0, target - done - stopped)} not started" if target is not None else "no new trial starts"
    return (f"{interrupted_line(e)}: {new} trial(s) finished in this run, {stopped} stopped (queued again: "
            f"it resumes from its checkpoint), {left}. Run the same command again to go on.")  # fmt: skip
