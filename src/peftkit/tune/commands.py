"""`peftkit tune`: registered with the CLI when the parser is built (heavy imports happen inside)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from ..command_args import ConfigOptions
from ..errors import RequestError
from ..terminal import printable
from ..train.config import field_defaults, field_help


def tune(
    experiment: Path,
    out: Path | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    objective: Literal["val_loss", "score"] = "val_loss",
    pruner: Literal["median", "halving", "none"] = "median",
    pruner_startup: int = 2,
    variants: bool = True,
    threads: int | None = None,
    overwrite: bool = False,
    overrides: Annotated[dict[str, Any], ConfigOptions(field_help, field_defaults)] | None = None,
) -> int:
    """Search training hyperparameters with Optuna, pruning poor trials from their validation curves.

    EXPERIMENT is a training config plus a `search:` section naming the ranges (the file `peftkit
    compare` reads): `lr: {low: 1e-4, high: 3e-3, log: true}` is a range, `lora.r: [4, 8, 16]` a list of
    choices, `lora.alpha_over_r: [1, 2]` sets lora_alpha = ratio x r, and `method: [lora, ia3]` samples
    each method's keys only when it is chosen. Without `search:`, LoRA searches lr, r, alpha_over_r and
    lora_dropout (docs/tune.md lists the defaults). Each trial trains in OUT/trials/N in its own process;
    the study lives in OUT/study.db, so rerunning the same command continues it. The run ends with
    OUT/best.yaml (run it with `peftkit train OUT/best.yaml`), OUT/trials.md (.csv, .json),
    objective.png and importance.png. Ctrl-C, SIGTERM and SIGHUP stop it alike: the running trial saves
    a checkpoint and is queued again, no new trial starts, and tune exits 128 + the signal.

    Args:
        experiment: the experiment YAML (training keys, search:, optional variants: and evaluate:)
        out: the tune run's directory; none: runs/tune-<experiment file name>
        trials: finished trials the study should hold, counting earlier runs'; none: 20, unless
            --timeout is given
        timeout: start no new trial after this many seconds (the running one finishes)
        objective: val_loss: minimise the best validation loss; score: maximise the task metric on the
            validation examples (never the test split)
        pruner: median: stop a trial whose validation loss is worse than the median of earlier trials at
            the same step; halving: successive halving (the best third go on at each rung); none
        pruner_startup: complete trials needed before any trial is pruned
        variants: run the file's variants first, as the first trials (they may set only searched keys)
        threads: CPU threads of each training process; none: OMP_NUM_THREADS, else torch's own
        overwrite: start afresh in an OUT that holds an earlier tune run (removes only tune's own files)
        overrides: training keys set on the command line for every trial (searched keys are still
            searched); --seed also seeds the sampler: the same seed gives the same suggestions
    """
    from ..experiment import read_experiment
    from ..experiment.outdir import default_out
    from .study import Settings, tune_experiment

    _check_options(trials, timeout, pruner_startup, threads)
    exp = read_experiment(experiment, overrides or {})
    out = out if out is not None else default_out("tune", experiment)
    settings = Settings(
        objective, pruner, trials, timeout, None, pruner_startup, threads, variants, overwrite
    )
    # Ctrl-C, SIGTERM or SIGHUP end it as a KeyboardInterrupt: the CLI exits 128 + the signal.
    result = tune_experiment(exp, out, settings, log=lambda line: print(printable(line), flush=True))
    best = result.best
    if best is None:
        print(f"no trial completed; see {out / 'trials.md'} and the logs in {out / 'logs'}")
        return 1
    print(printable(f"best: trial {best.number}, {objective} {best.value:.6g}; config {result.best_yaml}"))
    print(printable(f"report: {out / 'trials.md'}, {out / 'objective.png'}, {out / 'importance.png'}"))
    print(printable(f"train it: peftkit train {result.best_yaml}"))
    return 0


def _check_options(
    trials: int | None, timeout: float | None, pruner_startup: int, threads: int | None
) -> None:
    if trials is not None and trials < 1:
        raise RequestError(f"--trials must be at least 1, got {trials}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise RequestError(f"--timeout must be a number of seconds > 0, got {timeout}")
    if pruner_startup < 0:
        raise RequestError(f"--pruner-startup must be at least 0, got {pruner_startup}")
    if threads is not None and threads < 1:
        raise RequestError(f"--threads must be at least 1, got {threads}")
