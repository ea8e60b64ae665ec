"""Scoring the compared models: the task score, the scores on the other built-in tasks and the
perplexity on general text, for the base model and every variant.

Models that share a base (same base, same quantization) are loaded once and scored together in mixed
batches: every adapter variant with the base model itself, QLoRA variants on their own 4-bit base
(whose own row is a reference too), each full fine-tuning run as a model of its own. Results are
cached per model in OUT/eval/NAME.json under a key made of everything they depend on (the settings,
the general text, the model's and adapter's files), so a rerun scores only what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from .estimate import duration, plural
from .runs import Trained
from .settings import EvalSettings, general_text

BASE_ROW = "base"


@dataclass(frozen=True)
class Model:
    """One row of the comparison: what to load and which adapter (None: the loaded model itself)."""

    name: str
    load: str  # a base model (built-in name, directory, .gguf), or a full fine-tuning run's model dir
    quantize: str | None
    adapter: Path | None
    reference: str  # the row its changes are measured against: its full-precision base's


@dataclass
class Scores:
    score: float  # the metric's mean on the scored examples
    n: int
    forgetting: dict[str, float]  # other built-in task -> score
    perplexity: float  # on the general text
    text_tokens: int
    seconds: float  # its share of the evaluation's wall time
    mixed: bool = True  # scored in mixed batches with the other models of its base


def reference_names(bases: list[str], shared_base: str) -> dict[str, str]:
    """{base: its reference row's name}: "base" for the shared base, "base[LAST]" for another one (LAST:
    its path's last part), "base[LAST-HASH]" when another base has the same last part (HASH: 8 hex
    digits of its resolved path), so that two bases never share a row or a cache file."""
    where = {b: _resolved(b) for b in [shared_base, *bases]}  # two spellings of one directory: one base
    others = {w: Path(b).name or b for b, w in where.items() if w != where[shared_base]}
    lasts = list(others.values())
    names = {}
    for b, w in where.items():
        if w == where[shared_base]:
            names[b] = BASE_ROW
        elif lasts.count(others[w]) == 1:
            names[b] = f"{BASE_ROW}[{others[w]}]"
        else:
            names[b] = f"{BASE_ROW}[{others[w]}-{hashlib.sha256(w.encode()).hexdigest()[:8]}]"
    return names


def _resolved(base: str) -> str:
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def models_to_score(trained: list[Trained], shared_base: str) -> list[Model]:
    """The reference rows (the shared base; each other base or quantized base a variant uses), then
    every variant in the experiment's order. Each row's changes are measured against its base's
    full-precision row: a quantized base's own row shows what quantizing alone costs."""
    names = reference_names([t.config.base for t in trained], shared_base)
    refs = {(shared_base, None): None}
    for t in trained:
        refs[(t.config.base, None)] = None
        if not t.is_full:
            refs[(t.config.base, t.config.quantize)] = None
    rows, seen = [], set()
    for base, quantize in refs:
        name = names[base] + (f"+{quantize}" if quantize else "")
        if name not in seen:  # two spellings of one base (a path and its resolved form) share a row
            seen.add(name)
            rows.append(Model(name, base, quantize, None, names[base]))
    for t in trained:
        ref = names[t.config.base]
        if t.is_full:
            rows.append(Model(t.name, str(t.weights_dir), None, None, ref))
        else:
            rows.append(Model(t.name, t.config.base, t.config.quantize, t.weights_dir, ref))
    return rows


def score_models(
    models: list[Model], settings: EvalSettings, out: Path, say: Callable[[str], None] = print
) -> dict[str, Scores]:
    """{row name: Scores} for every model, from the cache where its key still matches."""
    text = general_text(settings)
    common = {"settings": settings.to_dict(), "text": hashlib.sha256(text.encode()).hexdigest()}
    if not settings.data.startswith("task:"):  # type: ignore[union-attr]
        common["data"] = _identity(Path(settings.data))  # type: ignore[arg-type]
    keys = {m.name: _key(common, m) for m in models}
    results = {m.name: s for m in models if (s := _cached(out, m.name, keys[m.name])) is not None}
    groups: dict[tuple[str, str | None], list[Model]] = {}
    for m in models:
        if m.name not in results:
            groups.setdefault((m.load, m.quantize), []).append(m)
    if not groups:
        say(f"evaluation: all {len(models)} models' scores are cached in {out / 'eval'}")
    for (load, quantize), group in groups.items():
        names = ", ".join(m.name for m in group)
        say(f"evaluating {names} on {load}{'+' + quantize if quantize else ''} ...")
        t0 = time.perf_counter()
        scored = score_group(load, quantize, group, settings, text, say)
        say(f"  evaluated {len(group)} model(s) in {time.perf_counter() - t0:.0f} s")
        for m in group:
            write_json_atomic(
                out / "eval" / f"{m.name}.json", {"key": keys[m.name], **asdict(scored[m.name])}
            )
            results[m.name] = scored[m.name]
    return {m.name: results[m.name] for m in models}


def score_group(
    load: str,
    quantize: str | None,
    group: list[Model],
    settings: EvalSettings,
    text: str,
    say: Callable[[str], None] = print,
) -> dict[str, Scores]:
    """Score every model of one base: as many adapters as can sit on one loaded copy of it (two methods
    cannot wrap the same module: LoRA and IA3 both wrap k_proj) are scored together in mixed batches;
    the others on the next copy."""
    from ..experiment.evaluation import DTYPE_ADVICE
    from ..tools.opening import open_model

    results: dict[str, Scores] = {}
    asked: list = [(f"v{i}", m.adapter) for i, m in enumerate(group) if m.adapter is not None]
    first = True
    while first or asked:
        opened = open_model(load, asked, dtype=settings.dtype, quantize=quantize, dtype_advice=DTYPE_ADVICE,
                            together="passes")  # fmt: skip
        loaded = {s.name for s in opened.sources if s not in opened.waiting}
        placed = {  # {alias: model} loaded on this copy; the base models join the first
            m.name if m.adapter is None else f"v{i}": m
            for i, m in enumerate(group)
            if (m.adapter is None and first) or f"v{i}" in loaded
        }
        results |= _score_loaded(
            opened.model, opened.tokenizer, placed, settings, text, _Progress(say, settings)
        )
        first, asked = False, opened.waiting  # read already: the next copy takes the same files
        del opened
    return results


def _score_loaded(
    net: Any, tokenizer: Any, placed: dict[str, Model], settings: EvalSettings, text: str, progress: _Progress
) -> dict[str, Scores]:
    from ..core.adapted import AdaptedModel
    from ..core.checks import check_can_share_a_batch
    from ..errors import RequestError

    names = [None if m.adapter is None else alias for alias, m in placed.items()]
    try:
        if isinstance(net, AdaptedModel):
            check_can_share_a_batch(net, names)
        mixed = True
    except RequestError:  # a method that cannot share a batch: each adapter runs on its own
        mixed = False
    t0 = time.perf_counter()
    task, forgetting = _task_scores(net, tokenizer, names, settings, mixed, progress)
    ppl = _text_scores(net, tokenizer, names, settings, text, mixed, progress)
    share = (time.perf_counter() - t0) / len(names)
    return {
        m.name: Scores(
            score=task[a].score,
            n=task[a].n,
            forgetting={t: r[a].score for t, r in forgetting.items()},
            perplexity=ppl[a][0],
            text_tokens=ppl[a][1],
            seconds=round(share, 1),
            mixed=mixed,
        )
        for m, a in zip(placed.values(), names, strict=True)
    }


def _task_scores(
    net: Any, tokenizer: Any, names: list, settings: EvalSettings, mixed: bool, progress: _Progress
) -> tuple:
    """({alias: task result}, {other task: {alias: result}}) via peftkit.eval.run.evaluate."""
    from ..core.rows import BASE
    from ..data.source import load_data
    from ..data.tasks import get_task
    from ..eval.run import evaluate
    from ..experiment.evaluation import max_new_tokens_for

    def run(label: str, examples: list, metric: str, max_new: int) -> dict:
        progress(
            label,
            f"{len(examples)} examples x {plural(len(names), 'model')}, up to {max_new} new tokens each",
        )
        report = evaluate(net, tokenizer, examples, metric=metric, adapters=names, max_new_tokens=max_new,
                          batch_size=settings.batch_size, with_perplexity=False, mixed=mixed)  # fmt: skip
        return {a: report[BASE if a is None else a] for a in names}

    examples = load_data(settings.data, split="test", n=settings.examples)  # type: ignore[arg-type]
    max_new = max_new_tokens_for(settings.max_new_tokens, settings.data, tokenizer, examples)  # type: ignore[arg-type]
    task = run(str(settings.data), examples, settings.metric, max_new)
    forgetting = {}
    for name in settings.forgetting_tasks or ():
        t = get_task(name)
        forgetting[name] = run(f"{name} (forgetting)", t.examples("test", settings.forgetting_examples),
                               t.metric, t.max_new_tokens)  # fmt: skip
    return task, forgetting


def _text_scores(
    net: Any, tokenizer: Any, names: list, settings: EvalSettings, text: str, mixed: bool, progress: _Progress
) -> dict:
    from .text import text_perplexity, text_windows

    windows = text_windows(tokenizer, text, settings.window)
    progress(
        "general text",
        f"{len(windows)} windows of up to {settings.window} tokens x {plural(len(names), 'model')}",
    )
    if mixed:
        return text_perplexity(net, windows, names, batch_size=settings.batch_size)
    out = {}
    for a in names:
        out.update(text_perplexity(net, windows, [a], batch_size=settings.batch_size))
    return out


class _Progress:
    """One counted line as each part of a loaded copy's scoring starts: the scored task, each
    forgetting task, the general text (generation also shows a progress bar on a terminal)."""

    def __init__(self, say: Callable[[str], None], settings: EvalSettings) -> None:
        self.say, self.done, self.started = say, 0, time.perf_counter()
        self.total = 2 + len(settings.forgetting_tasks or ())

    def __call__(self, label: str, work: str) -> None:
        self.done += 1
        elapsed = duration(time.perf_counter() - self.started)
        self.say(f"  scoring [{self.done}/{self.total}] {label}: {work} (elapsed {elapsed})")


def _identity(path: Path) -> list[tuple[str, int, int]] | str:
    """What changes when files change: (relative path, size, mtime) of each file under `path`."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    if not path.is_dir():
        return str(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _key(common: dict[str, Any], m: Model) -> str:
    load = Path(m.load).expanduser()
    facts = {**common, "load": m.load, "load_files": _identity(load) if load.exists() else m.load,
             "quantize": m.quantize, "adapter": None if m.adapter is None else _identity(m.adapter)}  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _cached(out: Path, name: str, key: str) -> Scores | None:
    try:
        data = json.loads((out / "eval" / f"{name}.json").read_text())
        if data.pop("key") != key:
            return None
        return Scores(**data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
