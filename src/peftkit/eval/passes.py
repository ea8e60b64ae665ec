"""Adapters scored side by side although not all of them can sit on one model at once.

Two methods cannot wrap one module (LoRA and IA³ both wrap k_proj by default), so `eval --adapters
LORA IA3` cannot load both onto one copy of the base. The adapters are grouped into passes instead: each
adapter goes into the first pass whose adapters it can share the model with, every pass is scored on
the same base (its adapters removed between passes, the base weights untouched), and the results come
back as one report in the order asked for. The grouping is planned before anything is scored, so every
adapter has been checked against the base (names, shapes, fingerprint) before the first slow pass.

    side = open_side_by_side(base, [("lora", lora_dir), ("ia3", ia3_dir)], "auto")
    report = side.evaluate(examples, metric="exact_match", max_new_tokens=8)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import TargetError

from .loading import attach, load_base_quietly, log, resolve_adapters
from .run import EvalReport, evaluate

Named = list[tuple[str, Path]]


@dataclass
class SideBySide:
    """The base model with one pass's adapters loaded, and how to load the others."""

    model: Any  # an AdaptedModel (the base itself when there are no adapters and no 4-bit base)
    tokenizer: Any
    passes: list[Named]  # passes[0] is loaded now
    order: list[str]  # the report's rows: "base", then the adapters as they were given
    load: Callable[[Any, str, Path], None]  # loads one adapter onto the AdaptedModel

    @property
    def directories(self) -> dict[str, Path]:
        """{adapter name: its directory (a registry reference resolved)}."""
        return {name: directory for named in self.passes for name, directory in named}

    def evaluate(self, examples: list, **options: Any) -> EvalReport:
        """`peftkit.eval.run.evaluate` of the base model and every adapter on `examples`, pass by pass
        (the base model's row in the first): one report, rows in the order the adapters were given."""
        t0 = time.perf_counter()
        reports = []
        for number, named in enumerate(self.passes):
            if number:
                log(f"pass {number + 1} of {len(self.passes)}: {', '.join(n for n, _ in named)} ...")
                self.model = _load_pass(self.model, named, self.load)
            names = [name for name, _ in named]
            adapters = [None, *names] if number == 0 else names
            reports.append(evaluate(self.model, self.tokenizer, examples, adapters=adapters, **options))
        results = {r.adapter: r for report in reports for r in report.results}
        mixed = all(r.mixed for r in reports)
        return EvalReport(
            reports[0].metric, [results[n] for n in self.order], time.perf_counter() - t0, mixed
        )


def open_side_by_side(
    base: str,
    adapters: Named,
    dtype: str,
    *,
    check_base: bool = True,
    quantize: str | None = None,
    registry: str | None = None,
) -> SideBySide:
    """Load the base and plan the passes (see the module docstring); the last pass planned stays
    loaded and is scored first, so no adapter is loaded more often than needed."""
    from peftkit.core.adapted import AdaptedModel

    resolved, from_registry = resolve_adapters(adapters, registry)

    def load(am: Any, name: str, directory: Path) -> None:
        attach(am, name, directory, base=base, check_base=check_base, registry=registry,
               audited=name in from_registry)  # fmt: skip

    model, tokenizer = load_base_quietly(base, dtype, quantize)
    order = ["base", *(name for name, _ in resolved)]
    if not resolved and not quantize:
        return SideBySide(model, tokenizer, [[]], order, load)
    # An AdaptedModel also for a bare 4-bit base: the adapted generate decodes it fast.
    am, passes = plan_passes(AdaptedModel(model), resolved, load)
    passes = passes or [[]]  # a bare 4-bit base: one pass, the base model's row alone
    return SideBySide(am, tokenizer, [passes[-1], *passes[:-1]], order, load)


def plan_passes(am: Any, adapters: Named, load: Callable[[Any, str, Path], None]) -> tuple[Any, list[Named]]:
    """(the AdaptedModel, the passes): each adapter joins the pass being filled unless it cannot share
    the model with that pass's adapters (a TargetError while others are loaded: two methods on one
    module), in which case it waits for the next pass. The last pass is left loaded. An adapter that
    fails alone on the bare base has a problem of its own, which is raised."""
    passes: list[Named] = []
    waiting = list(adapters)
    while waiting:
        if passes:
            am = _load_pass(am, [], load)
        placed: Named = []
        left: Named = []
        for name, directory in waiting:
            try:
                load(am, name, directory)  # checks everything before it changes anything
                placed.append((name, directory))
            except TargetError:
                if not placed:
                    raise
                left.append((name, directory))
        if left:
            log(
                f"{', '.join(repr(n) for n, _ in left)} cannot share one model with "
                f"{', '.join(repr(n) for n, _ in placed)} (two methods cannot wrap one module): "
                f"scored in a pass of {'its' if len(left) == 1 else 'their'} own on the same base"
            )
        passes.append(placed)
        waiting = left
    return am, passes


def _load_pass(am: Any, named: Named, load: Callable[[Any, str, Path], None]) -> Any:
    """A fresh AdaptedModel over `am`'s base with every adapter taken off (nothing was merged, so the
    base's own modules are back unchanged) and `named` loaded."""
    from peftkit.core.adapted import AdaptedModel

    fresh = AdaptedModel(am.unload())
    for name, directory in named:
        load(fresh, name, directory)
    return fresh
