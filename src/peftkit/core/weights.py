"""Weighted adapter sets at inference: several adapters active at once, each with its own weight, for
the whole model or per row of a mixed batch, with no new adapter files:

    am.set_adapter({"dates": 0.7, "sentiment": 0.5})           # y = base(x) + 0.7·Δ_dates + 0.5·Δ_sentiment
    am(input_ids=x, adapter_names=[{"dates": 0.7, "sentiment": 0.3}, "dates", None, {"sentiment": -1}])

A weight scales an adapter's additive change Δ (LoRA, rsLoRA: Δ = s·B·A·x), so the weighted set equals
`combine(..., how="cat")` with the same weights. Weights are finite numbers: 0 switches an adapter's
change off, a negative weight subtracts it (task arithmetic's "forgetting"). Methods whose change a
weight cannot scale (DoRA's renormalised weight, IA³'s multiplying vectors, soft prompts and prefixes,
bottleneck MLPs, which apply in sequence) take weight 1 only, so a plain name or list of names works
for them as before. This module checks the requests; the layers read `AdapterState.weights` and
`RowRouting.weights`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import AdapterStateError, RequestError
from ..methods import method_for
from .checks import bias_choice, check_can_share_a_batch, saved_modules_of
from .rows import BASE_NAMES, RowChoice, Weighted

if TYPE_CHECKING:
    from .adapted import AdaptedModel

AdapterChoice = str | Mapping[str, float] | Weighted | None
"""One entry of `adapter_names`: an adapter's name, a {name: weight} mapping, or None (the base model)."""

_COMBINE = "or combine LoRA adapters into one with `peftkit combine` (AdaptedModel.combine)"


def check_weight(name: str, value: Any) -> float:
    """`value` as the weight of adapter `name`: a finite real number (not a bool, not text). A 0-d
    tensor or a numpy scalar counts as its number."""
    number = value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise RequestError(
            f"the weight of adapter {name!r} is {value!r}; a weight is a number, e.g. {{{name!r}: 0.5}}"
        )
    weight = float(number)
    if not math.isfinite(weight):
        raise RequestError(
            f"the weight of adapter {name!r} is {weight}; weights must be finite numbers "
            "(0 switches an adapter off, a negative weight subtracts its change)"
        )
    return weight


def weighted_pairs(am: AdaptedModel, choice: Mapping[str, Any] | Weighted) -> tuple[tuple[str, float], ...]:
    """A {name: weight} mapping checked: at least one entry, every name attached, every weight a number."""
    items = choice.items if isinstance(choice, Weighted) else tuple(choice.items())
    if not items:
        raise RequestError(
            "an empty {name: weight} mapping names no adapter; name at least one (for the base model, "
            "use None in adapter_names, or `with am.disable_adapters():`)"
        )
    pairs = []
    for name, value in items:
        if not isinstance(name, str):
            raise RequestError(f"{name!r} in a {{name: weight}} mapping is no adapter name; names are text")
        am.check_exists(name)
        pairs.append((name, check_weight(name, value)))
    return tuple(pairs)


def weight_problem(am: AdaptedModel, name: str) -> str | None:
    """Why adapter `name` cannot take a weight other than 1, or None if it can."""
    return config_weight_problem(am.configs[name])


def config_weight_problem(config: Any) -> str | None:
    """Why an adapter with `config` (any method's) cannot take a weight other than 1, or None if it
    can: from the config alone, so the CLI asks before it loads a base model."""
    spec = method_for(config)
    if spec.weight_problem is None:
        return (
            f"it is a {spec.label} adapter ({spec.description}), which adds no change that a weight "
            "could scale"
        )
    problem = spec.weight_problem(config)
    if problem is None and saved_modules_of(config):
        problem = "it trains whole copies of modules (modules_to_save), and a copy cannot be weighted"
    if problem is None and bias_choice(config) != "none":
        problem = (
            f"it trains the base model's biases (bias={bias_choice(config)!r}), which cannot be weighted"
        )
    return problem


def activation(am: AdaptedModel, names: Any) -> tuple[tuple[str, ...], dict[str, float]]:
    """`set_adapter`'s argument checked: (the active names, their weights). A name or a list of names
    has weight 1 each; a {name: weight} mapping gives each its weight. A merged adapter keeps the
    weight it was merged with, so the weights reported are always the ones the model computes."""
    if isinstance(names, Mapping):
        pairs = weighted_pairs(am, names)
        for n, w in pairs:
            problem = weight_problem(am, n) if w != 1 else None
            if problem:
                raise RequestError(
                    f"adapter {n!r} cannot take weight {w:g}: {problem}. Activate it with weight 1 "
                    f"(set_adapter({n!r}), or in a list of names), {_COMBINE}"
                )
    else:
        pairs = tuple((n, 1.0) for n in _plain_names(am, names))
    merged = merged_weights(am)
    for n, w in pairs:
        if n in merged and merged[n] != w:
            plain = "" if isinstance(names, Mapping) else " (a plain name means weight 1)"
            raise AdapterStateError(
                f"adapter {n!r} is merged into the weights with weight {merged[n]:g}, so it cannot be "
                f"active with weight {w:g}{plain}; unmerge() before changing its weight, or activate "
                f"it as {{{n!r}: {merged[n]:g}}}"
            )
    return tuple(n for n, _ in pairs), {n: w for n, w in pairs if w != 1}


def _plain_names(am: AdaptedModel, names: Any) -> list[str]:
    if names is None or isinstance(names, bytes) or not isinstance(names, (str, Iterable)):
        raise RequestError(
            f"set_adapter takes an adapter name, a list of names or a {{name: weight}} mapping, not {names!r}; "
            "to run the base model alone, use `with am.disable_adapters():`"
        )
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        # An empty list would quietly run the base model; that has its own, reversible switch.
        raise RequestError(
            "set_adapter([]) names no adapter; to run the base model alone, use `with am.disable_adapters():`"
        )
    for n in names:
        am.check_exists(n)
    if len(set(names)) < len(names):
        raise RequestError(f"set_adapter({names}) names an adapter twice; name each once")
    return names


def merged_weights(am: AdaptedModel) -> dict[str, float]:
    """{merged adapter: the weight it was merged with}. Layers of methods that cannot be weighted
    record none: those adapters merge at 1."""
    merged: dict[str, float] = {}
    for _, layer in am.adapter_layers():
        for n in layer.merged:
            merged.setdefault(n, getattr(layer, "merged_weights", {}).get(n, 1.0))
    return merged


def row_choices(am: AdaptedModel, adapter_names: Sequence[AdapterChoice]) -> list[RowChoice]:
    """A mixed batch's `adapter_names` checked, one choice per row: an adapter's name, a `Weighted` set,
    or None (the base model). A mapping of one adapter at weight 1 is that adapter's plain name (its
    rows keep the one-adapter-per-row path); every other mapping may hold only adapters that can be
    weighted, and they must be able to share a batch."""
    rows: list[RowChoice] = []
    for i, entry in enumerate(adapter_names):
        if isinstance(entry, Mapping | Weighted):
            rows.append(_weighted_row(am, i, entry))
        elif isinstance(entry, str | None) and entry in BASE_NAMES:
            rows.append(None)
        elif isinstance(entry, str):
            am.check_exists(entry)
            rows.append(entry)
        else:
            raise RequestError(
                f"adapter_names[{i}] is {entry!r}; give each row an adapter name, a {{name: weight}} "
                "mapping, or None for the base model"
            )
    if len(set(rows)) > 1:  # rows differ: every adapter involved must route per row
        involved = [n for r in rows if r is not None for n in ((r,) if isinstance(r, str) else r.names)]
        check_can_share_a_batch(am, [None, *dict.fromkeys(involved)])
    return rows


def _weighted_row(am: AdaptedModel, row: int, entry: Mapping[str, Any] | Weighted) -> RowChoice:
    pairs = weighted_pairs(am, entry)
    if len(pairs) == 1 and pairs[0][1] == 1:
        return pairs[0][0]
    for name, _ in pairs:
        problem = weight_problem(am, name)
        if problem:
            raise RequestError(
                f"adapter_names[{row}]: adapter {name!r} cannot be in a weighted set: {problem}. Give its "
                f"rows its plain name, {_COMBINE}"
            )
    return Weighted(pairs)


def active_weights(am: AdaptedModel) -> dict[str, float]:
    """{active adapter: its weight} (1.0 for those activated without one)."""
    return {n: am.state.weight(n) for n in am.state.active}
