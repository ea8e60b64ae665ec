"""A/B decisions: two adapters (or versions) that share a route's traffic, compared on what users and
checks said about each, with a decision: promote the canary, keep collecting, or roll it back.

    decision = ab_decision(Registry.open(), "support")     # the route's canary split, from the audit log
    decision["decision"]                                    # "promote" | "continue" | "rollback"

The arms are the route's stable and canary targets (as its newest `route` audit entry sets them, or as
given), the data every captured sample and feedback on the route since that entry. Measures, canary
minus stable, each with a 95% interval and a p-value:
- feedback: the share of "up" among up and down (two-proportion z-test); the primary measure;
- validity: the share of outputs passing the name's validity check (two-proportion z-test);
- re-evaluation: the newest re-evaluated score of each version on the gate's eval set (two-proportion);
- latency and output length: means (bootstrap); latency is a guard, output length is only reported.
Guards are tested at alpha divided by their number (Bonferroni), so looking at several measures does
not multiply false alarms. A canary significantly worse on any guard is rolled back; one significantly
better on the primary measure (or, without feedback, on validity or the re-evaluation) and worse on
none is promoted; otherwise collecting goes on, and the result says how many more observations per arm
(feedback, or captured requests) it would take to see a difference of `mde` in the primary measure at
80% power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import RegistryError
from ..registry.traffic import feedback_of, samples_between
from ..registry.watch import Watch, add_result, results, watch_of
from .drift import is_valid
from .stats import bootstrap_difference, sample_size, two_proportions

MIN_PER_ARM = 20  # observations per arm before a measure can decide anything
LATENCY_TOLERANCE = 0.10  # a canary this much slower (relative) and significantly so is worse


@dataclass(frozen=True)
class Arm:
    """One side: the model name the split gives, and the adapter name and version it served as."""

    target: str
    name: str
    version: str

    def matches(self, name: str, version: str) -> bool:
        return (self.name, self.version) == (name, version)


def route_split(reg: Any, route: str) -> tuple[dict[str, Any], float]:
    """The route's split as its newest `route` audit entry set it, and that entry's time (Unix seconds)."""
    entries = [e for e in reg.history(route) if e.action == "route"]
    if not entries:
        raise RegistryError(
            f"route {route!r} has no canary split in the registry's audit log; set one with the admin "
            f"API (POST /admin/canary), or name both arms: `peftkit monitor ab {route} --stable A --canary B`"
        )
    entry = entries[-1]
    split = entry.details.get("after") or {}
    if not split.get("canary"):
        raise RegistryError(
            f"route {route!r} has no canary now (audit entry {entry.seq}): nothing to compare"
        )
    return split, datetime.fromisoformat(entry.when).timestamp()


def arm(reg: Any, target: str) -> Arm:
    """What a split target served as: NAME@N as is, a stage or a bare name as the version it names now,
    a name the registry does not know as an --adapters name (version "")."""
    name, _, rest = target.partition("@")
    if rest.isdigit():
        return Arm(target, name, rest)
    try:
        return Arm(target, name, str(reg.resolve_version(target).number))
    except RegistryError:
        return Arm(target, name, "")


def ab_decision(
    reg: Any,
    route: str,
    *,
    stable: str | None = None,
    canary: str | None = None,
    since: float | None = None,
    alpha: float = 0.05,
    mde: float = 0.05,
    record: bool = True,
) -> dict[str, Any]:
    """Compare the route's canary with its stable target (see the module docstring); JSON-able, with
    `decision`, `reason`, `measures` and `more` (what it still takes); recorded unless `record` is False."""
    if (stable is None) != (canary is None):
        raise RegistryError(
            f"name both arms or neither (then the route's split is used): `peftkit monitor ab {route} "
            "--stable A --canary B`"
        )
    if stable is None:
        split, started = route_split(reg, route)
        stable, canary = split["stable"], split["canary"]
    else:
        started = 0.0
    since = started if since is None else since
    a, b = arm(reg, stable), arm(reg, canary or "")
    names = {a.name, b.name}
    samples = [s for n in names for s in samples_between(reg.db, n, since) if s.model == route]
    feedback = [f for n in names for f in feedback_of(reg.db, n, since) if f.model == route]
    measures: dict[str, dict[str, Any]] = {}
    fa = [f.label for f in feedback if a.matches(f.name, f.version) and f.label != "neutral"]
    fb = [f.label for f in feedback if b.matches(f.name, f.version) and f.label != "neutral"]
    if fa and fb:
        measures["feedback"] = _rates(fa.count("up"), len(fa), fb.count("up"), len(fb), better=1)
    sa = [s for s in samples if a.matches(s.name, s.version)]
    sb = [s for s in samples if b.matches(s.name, s.version)]
    watch = watch_of(reg.db, b.name) or Watch()
    if watch.valid_regex is not None or watch.valid_schema is not None:
        va = [is_valid(watch, s.output) for s in sa if s.output is not None]
        vb = [is_valid(watch, s.output) for s in sb if s.output is not None]
        if va and vb:
            measures["validity"] = _rates(sum(va), len(va), sum(vb), len(vb), better=1)
    scored = _reeval(reg, a, b)
    if scored is not None:
        measures["reeval"] = scored
    for key, values, better in (("latency", "latency", -1), ("output_tokens", "output_tokens", 0)):
        xa, xb = [getattr(s, values) for s in sa], [getattr(s, values) for s in sb]
        if len(xa) >= 2 and len(xb) >= 2:
            measures[key] = {**bootstrap_difference(xa, xb).to_dict(), "better": better}
    result = decide(measures, alpha, mde)
    result.update(
        route=route, stable=stable, canary=canary, since=since, alpha=alpha, mde=mde,
        requests={"stable": len(sa), "canary": len(sb)}, feedback={"stable": len(fa), "canary": len(fb)},
        measures=measures,
    )  # fmt: skip
    result["more"] = _more(result, measures)
    if record:
        add_result(reg.db, "ab", route, b.version, result["decision"] == "rollback", result)
    return result


def _rates(k_a: int, n_a: int, k_b: int, n_b: int, better: int) -> dict[str, Any]:
    return {**two_proportions(k_a, n_a, k_b, n_b).to_dict(), "better": better}


def _reeval(reg: Any, a: Arm, b: Arm) -> dict[str, Any] | None:
    """The newest re-evaluation of each arm's version, compared, when both have one."""
    newest = {}
    for side in (a, b):
        found = [r for r in results(reg.db, side.name, "reeval") if r.version == side.version]
        if not found:
            return None
        newest[side] = found[-1].result
    n_a, n_b = newest[a]["n"], newest[b]["n"]
    if not all(0 <= newest[s]["score"] <= 1 for s in (a, b)):
        return None
    k_a, k_b = round(newest[a]["score"] * n_a), round(newest[b]["score"] * n_b)
    return _rates(k_a, n_a, k_b, n_b, better=1)


def decide(measures: dict[str, dict[str, Any]], alpha: float, mde: float) -> dict[str, Any]:
    guards = [k for k, m in measures.items() if m["better"] != 0 and min(m["n_a"], m["n_b"]) >= MIN_PER_ARM]
    level = alpha / max(1, len(guards))
    worse, better = [], []
    for key in guards:
        m = measures[key]
        m["significant"] = m["p"] < level
        direction = math.copysign(1, m["difference"]) * m["better"] if m["difference"] else 0
        if key == "latency" and abs(m["difference"]) < LATENCY_TOLERANCE * max(m["a"], 1e-9):
            direction = 0  # slower by less than the tolerance: not a reason to roll back
        if m["significant"] and direction < 0:
            worse.append(key)
        elif m["significant"] and direction > 0:
            better.append(key)
    primary = next((k for k in ("feedback", "validity", "reeval") if k in guards), None)
    if worse:
        return {"decision": "rollback", "reason": f"the canary is significantly worse on {', '.join(worse)}",
                "primary": primary, "level": level}  # fmt: skip
    if primary is not None and primary in better:
        return {"decision": "promote", "reason": f"the canary is significantly better on {primary} and "
                "worse on nothing", "primary": primary, "level": level}  # fmt: skip
    if primary is None:
        why = f"fewer than {MIN_PER_ARM} observations per arm on every measure that decides"
    else:
        why = f"no significant difference on {primary} yet (smallest difference looked for: {mde:g})"
    return {"decision": "continue", "reason": why, "primary": primary, "level": level}


def _more(result: dict[str, Any], measures: dict[str, Any]) -> dict[str, Any] | None:
    """How many more observations per arm of the primary measure (feedback given, captured outputs
    checked, eval examples) it takes to see a difference of `mde` at 80% power; None once decided."""
    if result["decision"] != "continue":
        return None
    key = result["primary"] or next((k for k in ("feedback", "validity", "reeval") if k in measures), None)
    if key is None:
        return {"measure": None, "per_arm": MIN_PER_ARM, "unit": "feedback or captured requests"}
    m = measures[key]
    rate = min(max(m["a"], 0.01), 0.99)
    target = rate + result["mde"] if rate + result["mde"] < 1 else rate - result["mde"]
    needed = max(MIN_PER_ARM, sample_size(rate, target, alpha=result["level"]))
    unit = {"feedback": "feedback (up or down)", "validity": "captured requests", "reeval": "eval examples"}[
        key
    ]
    return {"measure": key, "per_arm": max(0, needed - min(m["n_a"], m["n_b"])), "unit": unit}
