"""Drift: has the live traffic of an adapter moved away from what it was trained and gated for?

    result = check_drift(Registry.open(), "dates", window=200)   # also stored as a monitor result
    result["alert"], [(s["signal"], s["statistic"], s["threshold"], s["alert"]) for s in result["signals"]]

The window is the adapter name's newest `window` captured samples. The reference for its prompts is the
name's gate eval set when it has one (`peftkit registry gate`), each example's prompt rendered with the
chat template as the server renders a chat request; otherwise the samples captured before the window,
so an adapter served from a directory is watched too. Outputs are compared with the outputs captured
before the window, else with the eval set's reference answers.

Signals, each with its statistic, the threshold it alerts at, and whether it does:
- prompt_length, prompt_perplexity (the base model's per-token perplexity of the prompt, in log), and
  output_length: the population stability index (alert at `psi`, when the two-sample KS test also
  rejects at `alpha`, so a small window's noisy bins alone do not alarm);
- representation: MMD² between the base model's mean-pooled last hidden states of the two prompt sets
  (alert above its permutation threshold at `alpha`);
- empty, refusal and length-stop rates, and validity (the name's Watch: a regex or a JSON schema):
  the change in the rate (alert when it moves the bad way by `min_rate_gap` or more and the
  two-proportion test rejects at `alpha`).
Signals that need text are skipped (and said so) when the server captured hashes only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RegistryError
from ..registry.traffic import Sample, latest_samples
from ..registry.watch import Watch, add_result, watch_of
from .stats import ks_2samp, mmd_test, psi, two_proportions

MIN_SAMPLES = 10  # the fewest prompts a side of a comparison may have
MAX_REFERENCE = 1000  # captured samples before the window used as the reference, at most
MAX_TOKENS = 512  # prompt tokens the base model reads per prompt
REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:no|')t|i cannot|i(?: am|'?m) (?:not able|unable)|"
    r"as an ai\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: prompts (text, or None where only lengths are known) and outputs."""

    what: str
    prompts: list[str | None]
    prompt_tokens: list[int]
    outputs: list[str | None]
    output_tokens: list[int]
    finish: list[str]


def _traffic(samples: Sequence[Sample], what: str) -> Side:
    return Side(
        what,
        [s.prompt for s in samples],
        [s.prompt_tokens for s in samples],
        [s.output for s in samples],
        [s.output_tokens for s in samples],
        [s.finish_reason for s in samples],
    )


def check_drift(
    reg: Any,
    name: str,
    *,
    window: int | None = None,
    base: str | None = None,
    dtype: str = "auto",
    permutations: int = 200,
    record: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The drift of adapter `name`'s newest `window` captured requests (default: its Watch's) against its
    reference, as a JSON-able dict with `signals` and `alert`; recorded in the registry unless `record`
    is False. A RegistryError says what is missing (too few samples, no reference)."""
    say = log or (lambda message: None)
    watch = watch_of(reg.db, name) or Watch()
    size = window or watch.window
    rows = latest_samples(reg.db, name, size)
    if len(rows) < MIN_SAMPLES:
        raise RegistryError(
            f"{name!r} has {len(rows)} captured samples; a drift window needs at least {MIN_SAMPLES}: serve it "
            "with capture on (`peftkit serve --capture 0.1`) and let traffic arrive"
        )
    current = _traffic([s for _, s in rows], f"the newest {len(rows)} captured requests")
    version = rows[-1][1].version
    before = [s for _, s in latest_samples(reg.db, name, MAX_REFERENCE, before_id=rows[0][0])]
    from ..tools.opening import open_model

    opened = open_model(base or _recorded_base(reg, name, version), dtype=dtype, adapted=False, log=say)
    gate = reg.gate(name)
    if gate is not None:
        reference = _eval_set(reg, gate, opened.tokenizer)
    elif len(before) >= MIN_SAMPLES:
        reference = _traffic(before, f"the {len(before)} requests captured before the window")
    else:
        raise RegistryError(
            f"{name!r} has no gate eval set and only {len(before)} samples before the window: set a gate "
            f"(`peftkit registry gate {name} task:NAME`), or capture more traffic, or use a smaller window "
            f"(`peftkit monitor drift {name} --window N`)"
        )
    outputs_ref = _traffic(before, "earlier outputs") if len(before) >= MIN_SAMPLES else reference
    say(f"drift of {name}: {current.what} against {reference.what}")
    signals, skipped = _prompt_signals(opened, reference, current, watch, permutations)
    more, also_skipped = _output_signals(outputs_ref, current, watch)
    signals += more
    skipped.update(also_skipped)
    result = {
        "adapter": name,
        "version": version,
        "window": {"n": len(rows), "first_at": rows[0][1].at, "last_at": rows[-1][1].at},
        "reference": {"what": reference.what, "n": len(reference.prompt_tokens)},
        "outputs_reference": {"what": outputs_ref.what, "n": len(outputs_ref.output_tokens)},
        "signals": signals,
        "skipped": skipped,
        "alert": any(s["alert"] for s in signals),
    }
    if record:
        add_result(reg.db, "drift", name, version, result["alert"], result)
    return result


def _recorded_base(reg: Any, name: str, version: str) -> str:
    """The base model version `version` of `name` records, else the built-in one."""
    from ..base.catalog import DEFAULT_BASE

    if version:
        recorded = reg.resolve_version(f"{name}@{version}").base_model
        if recorded:
            return recorded
    return DEFAULT_BASE


def _eval_set(reg: Any, gate: Any, tokenizer: Any) -> Side:
    """The gate's eval examples as the server would see them: prompts rendered by the chat template."""
    from ..data.encode import encode_prompt
    from ..data.source import load_data
    from ..policy.promotion import gate_data

    examples = load_data(gate_data(reg, gate, "the gate's eval set").data, split="test", n=gate.n)
    ids = [encode_prompt(e.prompt, tokenizer) for e in examples]
    answers = [e.answer for e in examples]
    answer_tokens = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return Side(
        f"the gate eval set {gate.data} ({len(examples)} prompts)",
        [tokenizer.decode(i) for i in ids],
        [len(i) for i in ids],
        answers,
        answer_tokens,
        ["stop"] * len(examples),
    )


# -- prompts ---------------------------------------------------------------------------------------------
def _distribution(signal: str, ref: Sequence[float], cur: Sequence[float], watch: Watch) -> dict[str, Any]:
    value = psi(ref, cur)
    _, p = ks_2samp(ref, cur)
    return {
        "signal": signal,
        "statistic": value,
        "threshold": watch.psi,
        "alert": bool(value >= watch.psi and p < watch.alpha),
        "p_value": p,
        "test": "population stability index; two-sample Kolmogorov-Smirnov",
        "reference_mean": float(np.mean(ref)),
        "window_mean": float(np.mean(cur)),
    }


def _prompt_signals(
    opened: Any, reference: Side, current: Side, watch: Watch, permutations: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    signals = [_distribution("prompt_length", reference.prompt_tokens, current.prompt_tokens, watch)]
    ref_text = [t for t in reference.prompts if t is not None]
    cur_text = [t for t in current.prompts if t is not None]
    if len(ref_text) < MIN_SAMPLES or len(cur_text) < MIN_SAMPLES:
        why = "prompts were captured as hashes only (capture_text: false)"
        return signals, {"prompt_perplexity": why, "representation": why}
    ref_nll, ref_pooled = prompt_features(opened.model, opened.tokenizer, ref_text)
    cur_nll, cur_pooled = prompt_features(opened.model, opened.tokenizer, cur_text)
    signals.append(_distribution("prompt_perplexity", ref_nll, cur_nll, watch))
    signals[-1].update(reference_mean=math.exp(np.mean(ref_nll)), window_mean=math.exp(np.mean(cur_nll)))
    mmd2, threshold, p = mmd_test(ref_pooled, cur_pooled, alpha=watch.alpha, permutations=permutations)
    signals.append({
        "signal": "representation", "statistic": mmd2, "threshold": threshold, "alert": bool(mmd2 > threshold),
        "p_value": p, "test": "MMD² of mean-pooled hidden states (RBF kernel), permutation threshold",
    })  # fmt: skip
    return signals, {}


def prompt_features(
    model: Any, tokenizer: Any, texts: list[str], batch: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the base model's mean negative log-likelihood per token (N,) and its last hidden
    state averaged over the prompt's tokens (N, H). Prompts are read up to MAX_TOKENS tokens."""
    import torch

    ids = [
        tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_TOKENS] or [tokenizer.eos_token_id]
        for t in texts
    ]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    nll, pooled = [0.0] * len(ids), [None] * len(ids)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            width = max(len(ids[i]) for i in chunk)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(chunk):
                tokens[row, : len(ids[i])], mask[row, : len(ids[i])] = torch.tensor(ids[i]), 1
            out = model(
                input_ids=tokens.to(device), attention_mask=mask.to(device), output_hidden_states=True
            )
            logits = out.logits.float()  # (B, T, V)
            hidden = out.hidden_states[-1].float()  # (B, T, H)
            token_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:].to(device), reduction="none"
            )  # (B, T-1)
            m = mask.to(device).float()
            for row, i in enumerate(chunk):
                n = int(m[row].sum())
                nll[i] = float(token_nll[row, : n - 1].mean()) if n > 1 else 0.0
                pooled[i] = (hidden[row, :n].mean(dim=0)).cpu().numpy()
    return np.asarray(nll), np.stack(pooled)


# -- outputs ---------------------------------------------------------------------------------------------
def is_valid(watch: Watch, text: str) -> bool:
    """Whether an output passes the name's validity check (its regex in full, or its JSON schema)."""
    if watch.valid_regex is not None:
        return re.fullmatch(watch.valid_regex, text.strip()) is not None
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), watch.valid_schema or {})
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _rate(signal: str, ref: list[bool], cur: list[bool], worse: int, watch: Watch) -> dict[str, Any]:
    """A rate signal: `worse` is +1 when a higher rate is bad, -1 when a lower one is."""
    c = two_proportions(sum(ref), len(ref), sum(cur), len(cur))
    return {
        "signal": signal,
        "statistic": c.difference,
        "threshold": worse * watch.min_rate_gap,
        "alert": bool(worse * c.difference >= watch.min_rate_gap and c.p < watch.alpha),
        "p_value": c.p,
        "test": "change in rate (window - reference); two-proportion z-test",
        "reference_rate": c.a,
        "window_rate": c.b,
    }


def _output_signals(
    reference: Side, current: Side, watch: Watch
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    signals = [
        _distribution("output_length", reference.output_tokens, current.output_tokens, watch),
        _rate("length_stop_rate", [f == "length" for f in reference.finish], [f == "length" for f in current.finish], 1, watch),
    ]  # fmt: skip
    ref_out = [t for t in reference.outputs if t is not None]
    cur_out = [t for t in current.outputs if t is not None]
    if len(ref_out) < MIN_SAMPLES or len(cur_out) < MIN_SAMPLES:
        why = "outputs were captured as hashes only (capture_text: false)"
        return signals, {"empty_rate": why, "refusal_rate": why, "validity_rate": why}
    signals.append(
        _rate("empty_rate", [not t.strip() for t in ref_out], [not t.strip() for t in cur_out], 1, watch)
    )
    refused = [REFUSAL.match(t) is not None for t in ref_out], [REFUSAL.match(t) is not None for t in cur_out]
    signals.append(_rate("refusal_rate", *refused, 1, watch))
    if watch.valid_regex is None and watch.valid_schema is None:
        return signals, {"validity_rate": "the adapter declares no validity check (peftkit monitor watch)"}
    valid = [is_valid(watch, t) for t in ref_out], [is_valid(watch, t) for t in cur_out]
    signals.append(_rate("validity_rate", *valid, -1, watch))
    return signals, {}
