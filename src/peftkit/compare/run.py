"""`compare`: train every variant of an experiment, score them side by side, write the report.

    OUT/compare.json        marks the directory as a compare run's (nothing is ever written into a
                            directory that holds other files; see peftkit.experiment.outdir)
    OUT/configs/ runs/ logs/   the training runs (see peftkit.compare.runs)
    OUT/eval/NAME.json      each model's cached scores (see peftkit.compare.scoring)
    OUT/results.json        everything measured, per model
    OUT/report.md, report.html, score_vs_params.png, score_vs_time.png, forgetting_vs_score.png

Rerunning with the same OUT resumes: finished runs are reused, interrupted ones resume from their
checkpoint, and only models whose files or settings changed are scored again.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RequestError
from ..experiment import Experiment, read_experiment
from ..experiment.outdir import OutDir, claim_out_dir
from ..experiment.stopping import interrupted_line, stop_signals
from ..io import atomic_file, write_json_atomic
from ..train.config import TrainConfig
from .runs import require_variants, train_variants, variant_configs
from .scoring import BASE_ROW, models_to_score, score_models
from .settings import GENERAL_TEXT, EvalSettings, read_settings

OUT_DIR = OutDir(
    "compare", "compare.json",
    owned=("compare.json", "configs", "runs", "logs", "eval", "results.json", "report.md", "report.html",
           "score_vs_params.png", "score_vs_time.png", "forgetting_vs_score.png"),
)  # fmt: skip
KIND = OUT_DIR.kind


def compare(
    experiment_path: str | Path,
    out: str | Path,
    *,
    jobs: int = 1,
    overrides: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the comparison the experiment file describes into `out`; return results.json's content."""
    if jobs < 1:
        raise RequestError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out).expanduser()
    experiment = read_experiment(experiment_path, overrides)
    require_variants(experiment)
    if any(v.name == BASE_ROW for v in experiment.variants):
        raise ConfigError(f"a variant is named {BASE_ROW!r}, which names the base model's row; rename it")
    settings = read_settings(experiment.evaluation, experiment.config().data)
    configs = variant_configs(experiment, out)  # every config is built before the directory is claimed
    claim_out_dir(out, OUT_DIR, {"experiment": str(experiment.path)})
    shared_base = experiment.config().base
    say_scoring_plan(shared_base, settings, configs, say)
    with stop_signals():  # SIGTERM and SIGHUP stop compare as Ctrl-C does
        trained = train_variants(experiment, configs, out, jobs=jobs, say=say)
        models = models_to_score(trained, shared_base)
        try:
            scores = score_models(models, settings, out, say=say)
        except KeyboardInterrupt as e:
            say(
                f"{interrupted_line(e)} while scoring: every variant is trained, and the scores written "
                f"to {out / 'eval'} are kept. Run the same command again to score the rest."
            )
            raise
    from .report import build_rows

    results = {
        "kind": KIND,
        "experiment": _experiment_facts(experiment),
        "evaluation": settings.to_dict(),
        "general_text": {
            "name": settings.general_text or f"the shipped sample ({GENERAL_TEXT})",
            "tokens": scores[BASE_ROW].text_tokens,
        },
        "full_variant": next((t.name for t in trained if t.is_full), None),
        "mixed": all(s.mixed for s in scores.values()),
        "machine": machine_facts(),
        "rows": build_rows(models, scores, trained, shared_base),
    }
    results["machine_line"] = "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    write_report(results, out)
    say(f"wrote {out / 'report.md'}, {out / 'report.html'} and {out / 'results.json'}")
    return results


def say_scoring_plan(
    base: str, settings: EvalSettings, configs: dict[str, TrainConfig], say: Callable[[str], None]
) -> None:
    """Before anything trains: what scoring will cost, an estimate timed here, and how to make it quick."""
    from .estimate import groups_of, measure, plan_lines

    for line in plan_lines(measure(base, settings, groups_of(configs, base)), settings):
        say(line)


def write_report(results: dict[str, Any], out: Path) -> None:
    """results.json, report.md, the three plots and report.html, each written atomically."""
    from .pages import html_page, write_plots
    from .report import markdown

    write_json_atomic(out / "results.json", results)
    plots = write_plots(results, out)
    for name, text in (("report.md", markdown(results)), ("report.html", html_page(results, plots))):
        with atomic_file(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _experiment_facts(experiment: Experiment) -> dict[str, Any]:
    name = experiment.path.stem if experiment.path else "experiment"
    variants = [{"name": v.name, **v.overrides} for v in experiment.variants]
    file = {**experiment.shared, "variants": variants}
    if experiment.evaluation:
        file["evaluate"] = experiment.evaluation
    return {"name": name, "path": str(experiment.path), "file": file}


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on: the CPU, threads, accelerator, torch version and the date."""
    import torch

    facts: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _now(),
    }
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
