"""What scoring will cost, said before anything trains: the work (models, examples per task, tokens of
general text) and a time estimate from the base model's forwards, timed on this machine.

Scoring generates every answer greedily and reads the general text once per model, so its cost is
prefill (every prompt and window token through the model) plus decoding (one forward per new token per
batch). `measure` loads the shared base once and times one forward of a batch shaped like the scored
task's (rows x mean prompt length) and one decode step after it; `estimate_seconds` scales those to
every part of the work. It is an upper bound in one way (every answer is taken to run to its token
budget) and a lower one in another (adapters in mixed batches add their own cost), and it moves with
the machine's load: the printed line says what it is based on.

    plan = measure(base, settings, groups_of(configs, base))
    print("\n".join(plan_lines(plan, settings)))
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from ..train.config import FULL, TrainConfig
from .settings import EvalSettings, general_text
from .text import LOGIT_BUDGET

# A quick run's evaluate: keys, suggested when the settings ask for more (see `quick_run_advice`).
QUICK = {"examples": 20, "forgetting_tasks": [], "general_text_chars": 4000}


@dataclass(frozen=True)
class Part:
    """One thing every model is scored on: a task's examples, or the general text's windows."""

    label: str  # "task:dates", "sentiment (forgetting)", "general text"
    examples: int  # examples per model (general text: windows)
    prompt_tokens: float  # mean tokens per prompt (general text: the window)
    new_tokens: int  # the answer's token budget (general text: 0, one forward and no generation)
    batch_size: int  # rows per generate call or forward pass


@dataclass(frozen=True)
class Timing:
    """Forwards of the base model timed here: the measure every estimate is scaled from."""

    rows: int
    tokens: int  # per row
    prefill_s: float  # one forward of rows x tokens
    decode_s: float  # one decode step of `rows` rows after it (one new token each, KV cache)
    load_s: float  # loading the base model


def scoring_parts(settings: EvalSettings, tokenizer: Any, text: str) -> list[Part]:
    """The scored task, each forgetting task, then the general text, with their sizes in tokens."""
    from ..data.encode import encode_prompt
    from ..data.source import load_data
    from ..data.tasks import get_task
    from ..experiment.evaluation import max_new_tokens_for
    from .text import text_windows

    def part(label: str, examples: list, new_tokens: int) -> Part:
        lengths = [len(encode_prompt(ex.prompt, tokenizer)) for ex in examples]
        mean = sum(lengths) / len(lengths) if lengths else 0.0
        return Part(label, len(examples), mean, new_tokens, settings.batch_size)

    data = str(settings.data)
    examples = load_data(data, split="test", n=settings.examples)
    parts = [part(data, examples, max_new_tokens_for(settings.max_new_tokens, data, tokenizer, examples))]
    for name in settings.forgetting_tasks or ():
        task = get_task(name)
        parts.append(part(f"{name} (forgetting)", task.examples("test", settings.forgetting_examples),
                          task.max_new_tokens))  # fmt: skip
    windows = text_windows(tokenizer, text, settings.window)
    width = max((len(w) for w in windows), default=1)
    per_batch = max(1, min(settings.batch_size, LOGIT_BUDGET // width))
    parts.append(Part("general text", len(windows), width, 0, per_batch))
    return parts


def groups_of(configs: dict[str, TrainConfig], shared_base: str) -> list[int]:
    """How many models each loaded copy scores (see scoring.models_to_score): the reference rows and
    the adapter variants of one (base, quantization) together; each full fine-tuning run alone."""
    groups: dict[tuple[str, str | None], int] = {(shared_base, None): 1}
    full = 0
    for c in configs.values():
        groups.setdefault((c.base, None), 1)
        if c.quantize:
            groups.setdefault((c.base, c.quantize), 1)
        if c.method == FULL:
            full += 1
        else:
            groups[(c.base, c.quantize)] += 1
    return list(groups.values()) + [1] * full


@dataclass(frozen=True)
class Plan:
    """The scoring work, sized with the base's tokenizer, and the timing to scale it by."""

    parts: list[Part]
    quick: list[Part] | None  # the same work with the quick-run keys (None: the settings are no more)
    groups: list[int]  # models per loaded copy
    timing: Timing


def measure(base: str, settings: EvalSettings, groups: list[int]) -> Plan:
    """Load `base` (timed), size the work with its tokenizer, and time a forward of a batch shaped like
    the scored task's, then one decode step after it."""
    from ..base import load_base
    from ..experiment.evaluation import DTYPE_ADVICE

    t0 = time.perf_counter()
    model, tokenizer = load_base(base, dtype=settings.dtype, dtype_advice=DTYPE_ADVICE)
    load_s = time.perf_counter() - t0
    parts = scoring_parts(settings, tokenizer, general_text(settings))
    quick = quick_settings(settings)
    quick_parts = scoring_parts(quick, tokenizer, general_text(quick)) if quick != settings else None
    rows = max(1, min(parts[0].batch_size, parts[0].examples * max(groups)))
    timing = _time_forwards(model, rows, max(2, round(parts[0].prompt_tokens)), load_s)
    del model
    gc.collect()
    return Plan(parts, quick_parts, groups, timing)


def _time_forwards(model: Any, rows: int, tokens: int, load_s: float) -> Timing:
    import torch

    from ..core.kv_prefix import cache_argument

    cache = cache_argument(model)  # `cache` since transformers 5, `past_key_values` before
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(rows, tokens + 1, dtype=torch.long, device=device)
    prefill_s = decode_s = math.inf
    with torch.inference_mode():
        model(input_ids=ids[:1, :2])  # the first call pays one-time costs the scoring pays once too
        for _ in range(2):  # the faster of two: a new shape's first call pays for setting it up
            t0 = _now(device)
            out = model(input_ids=ids, use_cache=True)  # (B, T, V) logits, as the text's windows
            prefill_s = min(prefill_s, _now(device) - t0)
            step = out.logits[:, -1:].argmax(-1)  # (B, 1): one new token per row
            t0 = _now(device)
            model(input_ids=step, attention_mask=mask, **{cache: getattr(out, cache)})
            decode_s = min(decode_s, _now(device) - t0)
            if prefill_s > 1.0:  # slow enough to dwarf the set-up: a second try would only cost time
                break
    return Timing(rows, tokens, prefill_s, decode_s, load_s)


def _now(device: Any) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def estimate_seconds(parts: list[Part], timing: Timing, groups: list[int]) -> float:
    """The scoring time `timing` predicts: every prompt and window token at the measured prefill rate,
    one measured decode step per new token per batch, and one base load per group."""
    per_token = timing.prefill_s / (timing.rows * timing.tokens)
    total = timing.load_s * len(groups)
    for p in parts:
        for models in groups:
            rows = p.examples * models
            batches = math.ceil(rows / p.batch_size)
            total += rows * p.prompt_tokens * per_token + batches * p.new_tokens * timing.decode_s
    return total


def plan_lines(plan: Plan, settings: EvalSettings) -> list[str]:
    """What compare prints before training: the work, the estimate and what it rests on, and (when the
    settings ask for more than a quick run) which evaluate: keys make it quick."""
    parts, groups, t = plan.parts, plan.groups, plan.timing
    tasks = ", ".join(
        f"{p.label} {p.examples} examples (up to {p.new_tokens} new tokens)" for p in parts[:-1]
    )
    text = parts[-1]
    lines = [
        f"scoring plan: {plural(sum(groups), 'model')} ({plural(len(groups), 'model load')}); {tasks}; "
        f"general text {text.examples * int(text.prompt_tokens):,} tokens ({text.examples} windows of "
        f"{int(text.prompt_tokens)})",
        f"scoring estimate: up to about {duration(estimate_seconds(parts, t, groups))} on this machine, "
        f"from the base model timed here (a forward of {t.rows} x {t.tokens} tokens took {t.prefill_s:.2f} s, "
        f"a decode step {t.decode_s:.3f} s, loading {t.load_s:.1f} s); answers that end before their token "
        "budget take less, adapters in the batches add a little",
    ]
    if plan.quick is not None:
        quick = duration(estimate_seconds(plan.quick, t, groups))
        lines.append(f"quick run (about {quick}): set evaluate: {quick_run_advice(settings)} "
                     "(docs/compare.md, Scoring cost)")  # fmt: skip
    return lines


def _quick_keys(settings: EvalSettings) -> dict[str, Any]:
    """The QUICK evaluate: keys whose value the settings exceed."""
    keys: dict[str, Any] = {}
    if settings.examples is not None and settings.examples > QUICK["examples"]:
        keys["examples"] = QUICK["examples"]
    if settings.forgetting_tasks:
        keys["forgetting_tasks"] = QUICK["forgetting_tasks"]
    chars = settings.general_text_chars
    if chars is None or chars > QUICK["general_text_chars"]:
        keys["general_text_chars"] = QUICK["general_text_chars"]
    return keys


def quick_run_advice(settings: EvalSettings) -> str:
    """The evaluate: keys that make scoring quick, as a YAML flow mapping ("" when it is already)."""
    keys = _quick_keys(settings)
    return "{" + ", ".join(f"{k}: {v}" for k, v in keys.items()) + "}" if keys else ""


def quick_settings(settings: EvalSettings) -> EvalSettings:
    """`settings` with the quick-run keys applied."""
    keys = _quick_keys(settings)
    if "forgetting_tasks" in keys:
        keys["forgetting_tasks"] = ()
    return replace(settings, **keys)


def duration(seconds: float) -> str:
    """As precise as an estimate deserves: 40 s, 3 min, 1 h 20 min."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60)} min"


def plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
