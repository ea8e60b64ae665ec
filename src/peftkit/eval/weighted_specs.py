"""`--adapter DIR` and `DIR=WEIGHT` for `peftkit generate` and `peftkit chat`: the entries read, a
weight refused before the base model loads when the adapter's method cannot take one, and every
adapter loaded and active with its weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.errors import RequestError

from .loading import dir_adapter_name, load_model


def weighted_adapter_specs(specs: list[str]) -> tuple[list[tuple[str, Path]], dict[str, float]]:
    """(name, directory) for each --adapter entry (DIR or DIR=WEIGHT; an existing path containing "="
    is a directory), named after its directory, and {name: weight} for those given a weight."""
    import math

    named: list[tuple[str, Path]] = []
    weights: dict[str, float] = {}
    for spec in specs:
        where, sep, text = spec.rpartition("=")
        if not sep or not where or Path(spec).exists():
            named.append((dir_adapter_name(Path(spec), [n for n, _ in named]), Path(spec)))
            continue
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) and Path(text).exists():  # eval's and serve's NAME=DIR
            raise RequestError(
                f"--adapter {spec!r}: generate and chat name each adapter after its directory and take "
                f"DIR=WEIGHT, not NAME=DIR; write --adapter {text} (or {text}=0.5 to weight its change)"
            )
        if not math.isfinite(weight):
            raise RequestError(
                f"--adapter {spec!r}: {text!r} is not a weight; write DIR=WEIGHT with a finite number, "
                f"e.g. {where}=0.5 (or {where} alone for weight 1)"
            )
        named.append((dir_adapter_name(Path(where), [n for n, _ in named]), Path(where)))
        weights[named[-1][0]] = weight
    return named, weights


def check_weighted_methods(sources: list[Any], weights: dict[str, float], given: dict[str, str]) -> None:
    """Refuse, from each adapter's config (its files read already, `AdapterSource`), a weight other
    than 1 on an adapter whose method cannot take one (DoRA, IA³, prompts, prefixes, bottlenecks,
    modules_to_save, trained biases): before the base model loads. `given`: {name: what was typed}."""
    from peftkit.core.weights import config_weight_problem
    from peftkit.errors import PeftkitError
    from peftkit.formats.peft import config_from_peft

    for source in sources:
        if weights.get(source.name, 1.0) == 1:
            continue
        try:
            _, config = config_from_peft(source.files.config, source.directory)
        except PeftkitError:
            continue  # the load says what is wrong with it, in its own words
        problem = config_weight_problem(config)
        if problem:
            where = given[source.name]
            raise RequestError(
                f"--adapter {where}={weights[source.name]:g}: this adapter takes weight 1 only: {problem}. "
                f"Give {where} without =WEIGHT, or combine LoRA adapters with `peftkit combine`"
            )


def load_weighted(base: str, specs: list[str], dtype: str, **options: Any) -> tuple[Any, Any]:
    """`load_model` with the --adapter entries loaded and all of them active, each with its weight."""
    from peftkit.tools.opening import read_adapters

    named, weights = weighted_adapter_specs(specs)  # a bad weight fails before the slow load
    sources = read_adapters(named, options.get("registry"))  # each file read once, here
    check_weighted_methods(sources, weights, {name: str(where) for name, where in named})
    model, tokenizer = load_model(base, sources, dtype, **options)
    if len(named) > 1 or weights:
        model.set_adapter({name: weights.get(name, 1.0) for name, _ in named})
    return model, tokenizer
