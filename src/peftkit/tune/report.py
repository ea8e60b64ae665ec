"""What a tune run leaves behind: the trials table (trials.md, .csv, .json), the plots of the search
(objective.png: the objective per trial and the best so far; importance.png: parameter importances),
and best.yaml, the best trial's complete training config.

Importances are Optuna's PED-ANOVA, the one evaluator that needs neither scikit-learn nor scipy; it
needs at least two complete trials, and the plot says so when there are fewer.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any

from ..io import atomic_file, write_json_atomic
from ..train.config import save_config
from .space import Param, resolve

FIXED_COLUMNS = ("trial", "state", "objective", "val_loss", "score", "steps", "seconds")


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def trial_rows(study: Any, params: list[Param]) -> list[dict[str, Any]]:
    """One row per trial that ran (queued ones are left out), in trial order."""
    every = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in every}  # a queued retry too (after Ctrl-C)
    trials = [t for t in every if t.state.name != "WAITING"]
    rows = []
    for t in trials:
        a = t.user_attrs
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running"}.get(t.state.name, "failed")
        row = {
            "trial": t.number,
            "state": "interrupted" if t.number in retried else state,
            "objective": t.value if t.state.name == "COMPLETE" else None,
            "val_loss": a.get("val_loss"),
            "score": a.get("score"),
            "steps": a.get("steps"),
            "seconds": a.get("seconds"),
            "params": {p.key: t.params[p.key] for p in params if p.key in t.params},
        }
        row |= {k: a[k] for k in ("run_dir", "variant", "retry_of", "error") if k in a}
        rows.append(row)
    return rows


def importances(study: Any) -> tuple[dict[str, float] | None, str]:
    """(parameter -> importance, "") from the complete trials, or (None, why not)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"needs at least 2 complete trials, has {len(complete)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. no parameter varies yet
        return None, f"could not be computed: {str(e)[:120]}"


def write_report(out: Path, study: Any, params: list[Param], objective: str) -> Any | None:
    """Write trials.md/.csv/.json and the two plots; returns the best complete trial (None if none)."""
    rows = trial_rows(study, params)
    best = _best(study)
    scores, why = importances(study)
    keys = [p.key for p in params]
    summary = {
        "objective": objective,
        "direction": "maximize" if objective == "score" else "minimize",
        "best": None
        if best is None
        else {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "config": "best.yaml",
        },  # fmt: skip
        "importances": scores,
        "importances_note": why,
        "trials": rows,
    }
    write_json_atomic(out / "trials.json", summary)
    _write_text(out / "trials.csv", _csv(rows, keys))
    _write_text(out / "trials.md", _markdown(summary, keys))
    plot_objective(rows, objective, out / "objective.png")
    plot_importances(scores, why, out / "importance.png", sum(r["state"] == "complete" for r in rows))
    return best


def _best(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial
        return None


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*FIXED_COLUMNS, *keys, "run_dir", "error"])
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in FIXED_COLUMNS] + [_cell(r["params"].get(k)) for k in keys]
                        + [r.get("run_dir", ""), r.get("error", "")])  # fmt: skip
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else str(value)


def _markdown(summary: dict[str, Any], keys: list[str]) -> str:
    rows = summary["trials"]
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "interrupted")}
    lines = [f"# Tune: {summary['objective']} ({summary['direction']})", ""]
    lines.append(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    best = summary["best"]
    if best is not None:
        lines.append(f"Best: trial {best['trial']}, {summary['objective']} {best['value']:.6g} "
                     f"({format_params(best['params'])}); its config is best.yaml.")  # fmt: skip
    if summary["importances"]:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items())
        few = counts["complete"] < FEW_FOR_IMPORTANCES
        caveat = f" From {counts['complete']} complete trials only: read with care." if few else ""
        lines.append(f"Parameter importances (PED-ANOVA): {shown}.{caveat}")
    header = [*FIXED_COLUMNS, *keys]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_fmt(r.get(c)) for c in FIXED_COLUMNS] + [_fmt(r["params"].get(k)) for k in keys]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    errors = [f"- trial {r['trial']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + errors if errors else []) + [""])


FEW_FOR_IMPORTANCES = 10  # below this many complete trials, importances are mostly noise


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(7, 4), dpi=110)


def plot_objective(rows: list[dict[str, Any]], objective: str, png: Path) -> None:
    """The objective of each complete trial, the best so far as a step line, and (for val_loss) each
    pruned trial's best validation loss as a cross."""
    plt, (fig, ax) = _figure()
    maximize = objective == "score"
    done = [
        (r["trial"], r["objective"])
        for r in rows
        if r["objective"] is not None and math.isfinite(r["objective"])
    ]
    if done:
        ax.plot(*zip(*done), "o", color="tab:blue", label=f"complete trial ({objective})")
        best, line = None, []
        for number, value in done:
            best = value if best is None or (value > best if maximize else value < best) else best
            line.append((number, best))
        ax.step(*zip(*line), where="post", color="tab:orange", linewidth=2, label="best so far")
    pruned = [
        (r["trial"], r["val_loss"]) for r in rows if r["state"] == "pruned" and r.get("val_loss") is not None
    ]
    if pruned and not maximize:
        ax.plot(*zip(*pruned), "x", color="tab:gray", label="pruned trial (its best val_loss)")
    if not done and not pruned:
        ax.text(0.5, 0.5, "no complete trial yet", ha="center", va="center", transform=ax.transAxes)
    values = [v for _, v in done + (pruned if not maximize else [])]
    if values and min(values) > 0 and max(values) / min(values) > 20:  # a bad trial would flatten the rest
        ax.set_yscale("log")
    counts = ", ".join(f"{sum(r['state'] == s for r in rows)} {s}" for s in ("complete", "pruned", "failed"))
    ax.set(xlabel="trial", ylabel=objective, title=f"{objective} per trial ({counts})")
    ax.xaxis.get_major_locator().set_params(integer=True)  # trials are numbered
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend()
    _save(plt, fig, png)


def plot_importances(scores: dict[str, float] | None, why: str, png: Path, complete: int) -> None:
    plt, (fig, ax) = _figure()
    if scores:
        names = list(scores)[::-1]  # most important on top
        ax.barh(names, [scores[n] for n in names], color="tab:blue")
        title = "parameter importances"
        if complete < FEW_FOR_IMPORTANCES:
            title += f" (from {complete} complete trials: read with care)"
        ax.set(xlabel="importance (PED-ANOVA, sums to 1)", title=title)
    else:
        ax.text(0.5, 0.5, f"parameter importances: {why}", ha="center", va="center", wrap=True,
                transform=ax.transAxes)  # fmt: skip
        ax.set_axis_off()
    _save(plt, fig, png)


def _save(plt: Any, fig: Any, png: Path) -> None:
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_best(run: Any, best: Any) -> Path:
    """OUT/best.yaml: the best trial's complete training config (output_dir OUT/best), with a comment
    saying where it came from. `peftkit train OUT/best.yaml` reproduces the trial's training."""
    chosen = {p.key: p.value_of(best.params[p.key]) for p in run.params if p.key in best.params}
    config = run.experiment.config(
        {**run.fixed, **resolve(chosen, run.experiment)}, output_dir=str(run.out / "best")
    )
    path = run.out / "best.yaml"
    save_config(config, path)
    head = (f"# The best of the tune run in {run.out}: trial {best.number}, {run.settings.objective} {best.value:.6g}\n"
            f"# ({format_params(best.params)}). Train it with: peftkit train {path}\n")  # fmt: skip
    _write_text(path, head + path.read_text(encoding="utf-8"))
    return path
