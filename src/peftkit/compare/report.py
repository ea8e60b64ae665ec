"""The comparison's report: one row per model (what was measured plus what follows from it), as a
Markdown table, three PNG plots, and one self-contained HTML page that embeds them.

Derived columns: the score relative to full fine-tuning (score / the first `method: full` variant's
score), the general-text perplexity change against the base model (percent), and the mean score
change on the other built-in tasks against the base model (percentage points).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..methods import METHODS
from ..train.config import FULL, TrainConfig
from ..train.report import read_metrics
from .runs import Trained
from .scoring import Model, Scores

RESUMED = "†"  # marks the train time and peak memory of a run resumed after an interruption
# With an MLP projection, what prefix tuning trains and what it saves differ in size: a note says why.
PREFIX_PROJECTION = "prefix tuning (projection)"
RESUME_SLACK_S = 0.5  # rounding of summary.json's seconds and the records' times, and clock skew

PLOTS = {
    "score_vs_params": "score vs trainable parameters",
    "score_vs_time": "score vs training time",
    "forgetting_vs_score": "forgetting vs score",
}


def method_label(config: TrainConfig) -> str:
    """A short name for what a variant trains: "LoRA r=8", "DoRA r=16", "QLoRA r=16 (nf4)", "IA³", ..."""
    if config.method == FULL:
        return "full fine-tuning"
    if config.method == "prefix" and config.prefix.prefix_projection:
        return PREFIX_PROJECTION
    if config.method != "lora":
        return METHODS[config.method].label
    lora = config.lora
    kind = "DoRA" if lora.use_dora else "rsLoRA" if lora.use_rslora else "LoRA"
    if config.quantize:
        return f"Q{kind} r={lora.r} ({config.quantize})"
    return f"{kind} r={lora.r}"


def build_rows(
    models: list[Model], scores: dict[str, Scores], trained: list[Trained], shared_base: str
) -> list[dict[str, Any]]:
    """Every model's row: training facts (variants), scores, and the changes against its base's
    full-precision row (m.reference; `shared_base` is not needed for that any more)."""
    by_name = {t.name: t for t in trained}
    full = next((t.name for t in trained if t.is_full), None)
    rows = []
    for m in models:
        s, t = scores[m.name], by_name.get(m.name)
        ref = scores[m.reference]
        row: dict[str, Any] = {"name": m.name, "kind": "variant" if t else "reference"}
        row |= _training_facts(t) if t else _reference_facts(m)
        row |= {
            "score": s.score,
            "n": s.n,
            "relative_to_full": _ratio(s.score, scores[full].score) if full else None,
            "perplexity": s.perplexity,
            "text_tokens": s.text_tokens,
            "perplexity_change_pct": 100 * (s.perplexity / ref.perplexity - 1) if ref.perplexity else None,
            "other_tasks": s.forgetting,
            "other_tasks_change": {k: v - ref.forgetting[k] for k, v in s.forgetting.items()},
            "eval_seconds": s.seconds,
            "reference": m.reference,
        }
        changes = list(row["other_tasks_change"].values())
        row["other_tasks_mean_change"] = sum(changes) / len(changes) if changes else None
        rows.append(row)
    return rows


def _training_facts(t: Trained) -> dict[str, Any]:
    s = t.outcome.summary
    return {
        "method": method_label(t.config),
        "quantize": t.config.quantize,
        "trainable_parameters": s.get("trainable_parameters"),
        "size_mb": round(t.size_mb(), 3),
        "peak_rss_mb": t.outcome.peak_rss_mb,
        "tokens_per_s": s.get("tokens_per_s"),
        "train_seconds": s.get("seconds"),
        "steps": s.get("steps"),
        "best_val_loss": s.get("best_val_loss"),
        "precision": s.get("precision"),
        "reused": t.outcome.reused,
        "resumed": was_resumed(t.outcome.output_dir, s),
        "run_dir": str(t.outcome.output_dir),
        "weights_dir": str(t.weights_dir),
        "log": str(t.log),
    }


def _reference_facts(m: Model) -> dict[str, Any]:
    """A base model's row has the variants' keys, with nothing trained: None."""
    keys = ("trainable_parameters", "size_mb", "peak_rss_mb", "tokens_per_s", "train_seconds", "steps",
            "best_val_loss", "precision", "reused", "resumed", "run_dir", "weights_dir", "log")  # fmt: skip
    label = "base model" + (f" ({m.quantize})" if m.quantize else "")
    return {"method": label, "quantize": m.quantize, **dict.fromkeys(keys)}


def was_resumed(run_dir: Path, summary: dict[str, Any]) -> bool:
    """Whether the run's last process continued an earlier one's checkpoint, so that its summary's
    seconds and its peak memory cover that process only. Every step appends a timed record to
    metrics.jsonl, and a resumed run keeps the records up to its checkpoint: records that span more
    time than the last process's training loop took (its `seconds`) were partly written before it."""
    records = read_metrics(run_dir / "metrics.jsonl")
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    seconds = summary.get("seconds")
    if len(times) < 2 or not isinstance(seconds, (int, float)):
        return False
    return max(times) - min(times) > seconds + RESUME_SLACK_S


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# -- Markdown ------------------------------------------------------------------------------------
COLUMNS = (
    "variant", "method", "trainable params", "size on disk (MB)", "peak memory (MB)", "train tokens/s",
    "train time (s)", "score", "score / full FT", "general-text ppl (change)", "other tasks (change, pp)",
)  # fmt: skip


def table_cells(row: dict[str, Any]) -> list[str]:
    """The row's cells, formatted (— where a number does not apply)."""
    changed = row["reference"] != row["name"]  # a variant, or a quantized base against its own
    ppl = _num(row["perplexity"], "{:.2f}")
    if changed and row["perplexity_change_pct"] is not None:
        ppl += f" ({row['perplexity_change_pct']:+.1f}%)"
    others = ", ".join(f"{k} {v:.2f}" for k, v in row["other_tasks"].items()) or "—"
    if changed and row["other_tasks_mean_change"] is not None:
        others = f"{100 * row['other_tasks_mean_change']:+.1f} ({others})"
    mark = RESUMED if row.get("resumed") else ""
    return [
        row["name"],
        row["method"],
        _num(row.get("trainable_parameters"), "{:,}"),
        _num(row.get("size_mb"), "{:.2f}"),
        _num(row.get("peak_rss_mb"), "{:,.0f}") + mark,
        _num(row.get("tokens_per_s"), "{:,.0f}"),
        _num(row.get("train_seconds"), "{:,.1f}") + mark,
        f"{row['score']:.3f}",
        _num(row["relative_to_full"], "{:.2f}"),
        ppl,
        others,
    ]


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    """report.md: the table, then what each column means for this run."""
    rows = results["rows"]
    lines = [f"# peftkit compare: {results['experiment']['name']}", ""]
    lines += [f"Scored on {results['evaluation']['data']} ({results['evaluation']['metric']}, "
              f"{rows[0]['n']} examples). {results['machine_line']}", ""]  # fmt: skip
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |" for r in rows]
    lines += ["", *[f"- {note}" for note in notes(results)], ""]
    lines += [f"![{title}]({name}.png)" for name, title in PLOTS.items()]
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """What the columns mean, as measured here."""
    ev = results["evaluation"]
    full = results["full_variant"]
    out = [
        "trainable params, train tokens/s (padded tokens per second of the training loop) and train time "
        "(the training loop with its validations, model loading excluded) come from each run's summary.json; peak memory is "
        "the training process's maximum resident set (RSS), read from the kernel, in MB (10^6 bytes)",
        "size on disk: the adapter directory the run chose (best by validation loss, else last), or the "
        "whole model for full fine-tuning, in MB (10^6 bytes)",
        "score / full FT: the score divided by full fine-tuning's "
        + (
            f"({full}; — where it scored 0)"
            if full
            else "— no variant has method: full, so there is no such column"
        ),
        f"general-text ppl: perplexity on {results['general_text']['name']} "
        f"({results['general_text']['tokens']} tokens per model), change against the base model",
        "other tasks: score on the other built-in tasks ("
        + ", ".join(ev["forgetting_tasks"] or ["none"])
        + f", {ev['forgetting_examples']} test examples each); change = mean difference from the base "
        "model, in percentage points",
    ]
    return out + _run_notes(results)


def _run_notes(results: dict[str, Any]) -> list[str]:
    """The notes only some comparisons need."""
    rows, out = results["rows"], []
    quantized = [r["name"] for r in rows if r["kind"] == "reference" and r.get("quantize")]
    if quantized:
        out.append("quantized (QLoRA) variants are scored on their 4-bit base; their changes are against "
                   "the full-precision base, so they include the quantization's own loss, shown alone by "
                   f"the quantized base's row ({', '.join(quantized)})")  # fmt: skip
    if any(r.get("resumed") for r in rows):
        out.append(f"{RESUMED} resumed after an interruption: train time and peak memory are the last "
                   "process's only (train tokens/s is that process's rate)")  # fmt: skip
    if any(r["method"] == PREFIX_PROJECTION for r in rows):
        out.append("prefix tuning (projection): trainable params count what trained (the virtual tokens' "
                   "embeddings and the MLP that computes the key/value table from them), while the adapter "
                   "on disk holds only the computed table (as HF PEFT saves it), so its size does not follow "
                   "from the parameter count")  # fmt: skip
    if not results["mixed"]:
        out.append("some methods could not share a batch, so each model was scored on its own")
    return out
