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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.tools.opening import AdapterSource, OpenedModel, open_model

from .loading import log
from .run import EvalReport, evaluate

Attach = Callable[[Any, Sequence[AdapterSource]], list[AdapterSource]]  # -> those that did not fit


@dataclass
class SideBySide:
    """The base model with one pass's adapters loaded, and how to load the others."""

    model: Any  # an AdaptedModel (the base itself when there are no adapters and no 4-bit base)
    tokenizer: Any
    passes: list[list[AdapterSource]]  # passes[0] is loaded now
    order: list[str]  # the report's rows: "base", then the adapters as they were given
    attach: Attach  # loads adapters onto the AdaptedModel

    @property
    def sources(self) -> dict[str, AdapterSource]:
        """{adapter name: its source (files read once, a registry reference resolved)}."""
        return {source.name: source for sources in self.passes for source in sources}

    @property
    def directories(self) -> dict[str, Path]:
        """{adapter name: its directory (a registry reference resolved)}."""
        return {name: source.directory for name, source in self.sources.items()}

    def evaluate(self, examples: list, **options: Any) -> EvalReport:
        """`peftkit.eval.run.evaluate` of the base model and every adapter on `examples`, pass by pass
        (the base model's row in the first): one report, rows in the order the adapters were given."""
        t0 = time.perf_counter()
        reports = []
        for number, sources in enumerate(self.passes):
            names = [source.name for source in sources]
            if number:
                log(f"pass {number + 1} of {len(self.passes)}: {', '.join(names)} ...")
                self.model = _load_pass(self.model, sources, self.attach)
            adapters = [None, *names] if number == 0 else names
            reports.append(evaluate(self.model, self.tokenizer, examples, adapters=adapters, **options))
        results = {r.adapter: r for report in reports for r in report.results}
        mixed = all(r.mixed for r in reports)
        return EvalReport(
            reports[0].metric, [results[n] for n in self.order], time.perf_counter() - t0, mixed
        )


def open_side_by_side(
    base: str,
    adapters: Sequence[tuple[str, str | Path]],
    dtype: str,
    *,
    check_base: bool = True,
    quantize: str | None = None,
    registry: str | None = None,
) -> SideBySide:
    """Load the base and plan the passes (see the module docstring); the last pass planned stays
    loaded and is scored first, so no adapter is loaded more often than needed."""
    from peftkit.tools.opening import attach_adapters

    def attach(am: Any, sources: Sequence[AdapterSource]) -> list[AdapterSource]:
        return attach_adapters(am, sources, base=base, check_base=check_base, registry=registry,
                               together="passes", log=log)  # fmt: skip

    opened = open_model(base, adapters, dtype=dtype, check_base=check_base, quantize=quantize,
                        registry=registry, together="passes", log=log)  # fmt: skip
    order = ["base", *(name for name, _ in adapters)]
    if not adapters and not quantize:
        return SideBySide(opened.model, opened.tokenizer, [[]], order, attach)
    # An AdaptedModel also for a bare 4-bit base: the adapted generate decodes it fast.
    am, passes = plan_passes(opened, attach)
    passes = passes or [[]]  # a bare 4-bit base: one pass, the base model's row alone
    return SideBySide(am, opened.tokenizer, [passes[-1], *passes[:-1]], order, attach)


def plan_passes(opened: OpenedModel, attach: Attach) -> tuple[Any, list[list[AdapterSource]]]:
    """(the AdaptedModel, the passes): `opened` holds the first pass, and `waiting` the adapters that
    could not share the model with it (a TargetError while others are loaded: two methods on one
    module); each later pass takes what fits of what still waits. The last pass is left loaded."""
    am, waiting = opened.model, opened.waiting
    passes = [[s for s in opened.sources if s not in waiting]] if opened.sources else []
    while waiting:
        log(
            f"{', '.join(repr(s.name) for s in waiting)} cannot share one model with "
            f"{', '.join(repr(s.name) for s in passes[-1])} (two methods cannot wrap one module): "
            f"scored in a pass of {'its' if len(waiting) == 1 else 'their'} own on the same base"
        )
        am = _load_pass(am, [], attach)
        left = attach(am, waiting)
        passes.append([s for s in waiting if s not in left])
        waiting = left
    return am, passes


def _load_pass(am: Any, sources: Sequence[AdapterSource], attach: Attach) -> Any:
    """A fresh AdaptedModel over `am`'s base with every adapter taken off (nothing was merged, so the
    base's own modules are back unchanged) and `sources` loaded."""
    from peftkit.core.adapted import AdaptedModel

    fresh = AdaptedModel(am.unload())
    attach(fresh, sources)
    return fresh
