"""The comparison's pictures and page: three PNG plots (matplotlib, Agg) and report.html, one file
with the table, the plots as base64 data URIs, the experiment and the machine, and no external resource."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from .report import COLUMNS, PLOTS, notes, table_cells


def write_plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """score_vs_params.png, score_vs_time.png and forgetting_vs_score.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    variants = [r for r in rows if r["kind"] == "variant"]
    base = next(r for r in rows if r["name"] == "base")
    metric = results["evaluation"]["metric"]
    specs = {
        "score_vs_params": ("trainable_parameters", "score", "trainable parameters (log scale)", metric, True),
        "score_vs_time": ("train_seconds", "score", "training time (s)", metric, False),
        "forgetting_vs_score": (
            "score", "perplexity_change_pct", metric, "general-text perplexity change vs base (%)", False,
        ),
    }  # fmt: skip
    paths = {}
    for name, (xkey, ykey, xlabel, ylabel, logx) in specs.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = [(r[xkey], r[ykey], r["name"]) for r in variants if _finite(r.get(xkey), r.get(ykey))]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if ykey == "score":
            ax.axhline(base["score"], color="gray", linestyle="--", linewidth=1, label="base model")
            ax.legend(loc="best", fontsize=8)
        else:
            ax.axhline(0, color="gray", linestyle="--", linewidth=1)
        if logx and points and all(p[0] > 0 for p in points):
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=PLOTS[name])
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.reference { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def html_page(results: dict[str, Any], plots: dict[str, Path]) -> str:
    """report.html: everything in one file (plots as data URIs), safe to mail or archive."""
    import yaml

    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = []
    for r in results["rows"]:
        cells = table_cells(r)
        tds = "".join(f"<td{' class=num' if i >= 2 else ''}>{e(c)}</td>" for i, c in enumerate(cells))
        body.append(f'<tr class="{e(r["kind"])}">{tds}</tr>')
    images = []
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        images.append(
            f'<h3>{e(PLOTS[name])}</h3><img alt="{e(PLOTS[name])}" src="data:image/png;base64,{data}">'
        )
    experiment = yaml.safe_dump(results["experiment"]["file"], sort_keys=False, allow_unicode=True)
    settings = yaml.safe_dump(results["evaluation"], sort_keys=False)
    machine = "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in results["machine"].items())
    title = f"peftkit compare: {results['experiment']['name']}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        "<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes(results)) + "</ul>",
        *images,
        "<h2>Experiment</h2>", f"<pre>{e(experiment)}</pre>",
        "<h2>Evaluation settings</h2>", f"<pre>{e(settings)}</pre>",
        "<h2>Machine</h2>", f"<ul>{machine}</ul>",
        "</body></html>",
    ]) + "\n"  # fmt: skip
