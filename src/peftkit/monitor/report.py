"""`peftkit monitor report NAME --html OUT.html`: one self-contained page (plots inline as SVG, no
script, nothing fetched) of an adapter's life in production, from the registry: the re-evaluated score
per version over time, each drift signal's statistic against its threshold, feedback per day per
version, the newest A/B decisions on its routes, and the audit log entries that changed it.
"""

from __future__ import annotations

import html
import io
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io import atomic_file
from ..registry.traffic import feedback_of
from ..registry.watch import Result, results

DAY = 86400.0
_STYLE = (
    "body{font:14px system-ui,sans-serif;margin:2em;max-width:72em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:left}.alert{color:#b00;font-weight:600}figure{margin:0 0 1.5em}"
)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _svg(draw: Any, title: str, ylabel: str) -> str:
    """One matplotlib figure drawn by `draw(ax)`, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    drawn = draw(ax)
    if not drawn:
        ax.text(0.5, 0.5, "nothing recorded yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        xs = [x for line in ax.get_lines() for x in mdates.date2num(list(line.get_xdata()))]
        pad = max((max(xs) - min(xs)) * 0.05, 1 / 48)  # at least half an hour each side of a lone check
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg")
    plt.close(fig)
    text = out.getvalue()
    return text[text.index("<svg") :]


def _dates(times: list[float]) -> list[datetime]:
    return [datetime.fromtimestamp(t, timezone.utc) for t in times]


def _score_plot(reeval: list[Result]) -> str:
    def draw(ax: Any) -> bool:
        by_version: dict[str, list[Result]] = defaultdict(list)
        for r in reeval:
            by_version[r.version].append(r)
        for version, rows in sorted(by_version.items(), key=lambda kv: int(kv[0] or 0)):
            ax.plot(
                _dates([r.at for r in rows]),
                [r.result["score"] for r in rows],
                "o-",
                label=f"version {version}",
            )
            alerts = [r for r in rows if r.alert]
            if alerts:
                ax.plot(
                    _dates([r.at for r in alerts]), [r.result["score"] for r in alerts], "rx", markersize=10
                )
        return bool(reeval)

    metric = reeval[-1].result.get("metric", "score") if reeval else "score"
    return _svg(draw, "re-evaluated score on the gate's eval set (x: alert)", metric)


def _drift_plots(drift: list[Result]) -> list[str]:
    signals: dict[str, list[tuple[float, float, float, bool]]] = defaultdict(list)
    for r in drift:
        for s in r.result.get("signals", []):
            signals[s["signal"]].append((r.at, s["statistic"], s["threshold"], s["alert"]))
    plots = []
    for signal, rows in signals.items():

        def draw(ax: Any, rows: list = rows) -> bool:
            times = _dates([t for t, *_ in rows])
            ax.plot(times, [v for _, v, _, _ in rows], "o-", label="statistic")
            ax.plot(
                times, [h for _, _, h, _ in rows], "_--", color="tab:red", markersize=14, label="threshold"
            )
            fired = [(t, v) for (t, v, _, a) in rows if a]
            if fired:
                ax.plot(
                    _dates([t for t, _ in fired]), [v for _, v in fired], "rx", markersize=10, label="alert"
                )
            return True

        plots.append(_svg(draw, f"drift: {signal}", "statistic"))
    return plots or [_svg(lambda ax: False, "drift", "")]


def _feedback_plot(name: str, reg: Any, since: float) -> str:
    rows = feedback_of(reg.db, name, since)

    def draw(ax: Any) -> bool:
        days: dict[str, dict[float, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for f in rows:
            if f.label != "neutral":
                day = f.at - f.at % DAY
                days[f.version][day][0 if f.label == "up" else 1] += 1
        for version, counts in sorted(days.items()):
            keys = sorted(counts)
            share = [counts[d][0] / sum(counts[d]) for d in keys]
            ax.plot(_dates(keys), share, "o-", label=f"version {version or '-'} (up share)")
        ax.set_ylim(-0.05, 1.05)
        return bool(days)

    return _svg(draw, "feedback: share of up among up and down, per day", "up / (up + down)")


def _table(rows: list[list[Any]], head: list[str]) -> str:
    cells = "".join("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells += "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
    return f"<table>{cells}</table>"


def write_report(reg: Any, name: str, out: Path, days: float = 30.0) -> Path:
    """Write the report of adapter `name` over the last `days` days to `out` (atomically)."""
    since = time.time() - days * DAY
    reeval, drift = results(reg.db, name, "reeval", since), results(reg.db, name, "drift", since)
    ab = [r for r in results(reg.db, kind="ab", since=since) if r.result.get("canary", "").startswith(name)]
    parts = [f"<h1>{html.escape(name)}: production monitoring</h1>",
             f"<p>The last {days:g} days, from the registry; written {_when(time.time())}.</p>",
             "<h2>Re-evaluation</h2>", f"<figure>{_score_plot(reeval)}</figure>",
             "<h2>Drift</h2>", *(f"<figure>{svg}</figure>" for svg in _drift_plots(drift))]  # fmt: skip
    if drift:
        newest = drift[-1].result
        parts.append(f"<p>Newest check {_when(drift[-1].at)}: {newest['window']['n']} requests against "
                     f"{html.escape(newest['reference']['what'])}.</p>")  # fmt: skip
        parts.append(_table([[html.escape(s["signal"]), f"{s['statistic']:.4g}", f"{s['threshold']:.4g}",
                              '<span class="alert">ALERT</span>' if s["alert"] else "ok"]
                             for s in newest["signals"]], ["signal", "statistic", "threshold", "alert"]))  # fmt: skip
    parts += [
        "<h2>Feedback</h2>",
        f"<figure>{_feedback_plot(name, reg, since)}</figure>",
        "<h2>A/B decisions</h2>",
    ]
    parts.append(_table([[_when(r.at), html.escape(r.name), html.escape(str(r.result.get("canary"))),
                          html.escape(r.result["decision"]), html.escape(r.result["reason"])] for r in ab],
                        ["when", "route", "canary", "decision", "why"]) if ab else "<p>none</p>")  # fmt: skip
    entries = [e for e in reg.history(name) if datetime.fromisoformat(e.when).timestamp() >= since]
    parts.append("<h2>Audit log</h2>")
    parts.append(_table([[html.escape(e.when), html.escape(e.who), html.escape(e.action), e.version or "",
                          html.escape(str({k: v for k, v in e.details.items() if k != "gate"}))[:300]]
                         for e in entries], ["when", "who", "action", "version", "details"]))  # fmt: skip
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}: '
            f"monitoring</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip
    with atomic_file(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
