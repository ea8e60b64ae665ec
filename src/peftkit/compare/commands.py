"""`peftkit compare`: registered with the CLI when the parser is built."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from ..command_args import ConfigOptions
from ..train.config import field_defaults, field_help


def compare(
    experiment: Path,
    out: Path | None = None,
    jobs: int = 1,
    overrides: Annotated[dict[str, Any], ConfigOptions(field_help, field_defaults)] | None = None,
) -> int:
    """Train several fine-tuning variants on the same task, data and budget, and compare them.

    EXPERIMENT is a training config plus a `variants:` list (each entry overrides the shared keys)
    and an optional `evaluate:` section. Every variant trains in its own process (reused when it
    already finished, resumed when interrupted); then all models are scored side by side, adapters
    of one base in the same mixed batches: the task score, perplexity on a held-out general text
    and the scores on the other built-in tasks (forgetting). Writes OUT/report.md, report.html (self-
    contained), results.json and three PNG plots. docs/compare.md has the file format and columns.
    Ctrl-C, SIGTERM and SIGHUP stop it alike: no new run starts, the running ones save a checkpoint,
    and it exits 128 + the signal (130, 143, 129); the same command then resumes.

    Args:
        experiment: the experiment YAML file (training keys + variants + evaluate)
        out: the comparison's directory (new, empty, or an earlier compare's, which resumes);
            default runs/compare-NAME, NAME being the experiment file's name
        jobs: training runs at once (each gets cores // jobs threads)
        overrides: training keys set on the command line for every variant (a variant's own keys win)
    """
    from ..experiment.outdir import default_out
    from .run import compare as run_compare

    out = out if out is not None else default_out("compare", experiment)
    # Ctrl-C, SIGTERM or SIGHUP end it as a KeyboardInterrupt: the CLI exits 128 + the signal.
    run_compare(experiment, out, jobs=jobs, overrides=overrides or {}, say=lambda s: print(s, flush=True))
    return 0
