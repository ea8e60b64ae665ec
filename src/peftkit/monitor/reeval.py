"""Re-evaluation: score each production adapter on its gate's eval set again, record the score, and
alert when it fell.

    result = reevaluate(Registry.open(), "dates")     # recorded as a monitor result ("reeval")

The score it is held to (its reference) is the score the version had when it passed its gate on the
way to production (stored with the promotion in the audit log); a version promoted with --force has
none, and is held to the last re-evaluated score of the production version before it. It alerts when
the score is below the gate's `min_score`, or fell by the name's `max_drop` (its Watch) or more; with
`reeval_test: significance` a drop alerts only when a two-proportion test also rejects at `alpha`
(for scores that are shares of examples, such as exact match).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import RegistryError
from ..registry.watch import Watch, add_result, results, watch_of
from .stats import two_proportions


def reevaluate(
    reg: Any, name: str, *, record: bool = True, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Score `name`'s production version on its gate's eval set; the result (JSON-able), recorded
    unless `record` is False. A RegistryError when there is no production version or no gate."""
    from ..policy.promotion import evaluate_on_gate, gate_data

    say = log or (lambda message: None)
    version = reg.resolve_version(f"{name}@production")
    gate = reg.gate(name)
    if gate is None:
        raise RegistryError(f"{name!r} has no evaluation gate, whose eval set re-evaluation scores: set one "
                            f"with `peftkit registry gate {name} task:NAME` (or a data file)")  # fmt: skip
    base = gate.base or version.base_model
    if not base:
        raise RegistryError(f"{version.ref} does not record its base model: give its gate one, "
                            f"`peftkit registry gate {name} {gate.data} --base BASE`")  # fmt: skip
    say(f"re-evaluating {version.ref} on {gate.data} ({gate.n} examples) ...")
    metric, examples, _, report = evaluate_on_gate(
        gate_data(reg, gate, f"{name}'s gate data"), base, [("production", reg.resolve(version.ref))]
    )
    score = report["production"].score
    watch = watch_of(reg.db, name) or Watch()
    reference = _reference(reg, name, version.number)
    checks: dict[str, bool] = {}
    if gate.min_score is not None:
        checks[f"{metric} >= gate's min_score {gate.min_score:g}"] = score >= gate.min_score
    result: dict[str, Any] = {
        "adapter": name, "version": str(version.number), "metric": metric, "score": score,
        "base_score": report["base"].score, "n": len(examples), "data": gate.data, "reference": reference,
        "threshold": watch.max_drop, "test": watch.reeval_test,
    }  # fmt: skip
    if reference is not None:
        drop = reference["score"] - score
        result["drop"] = drop
        fell = drop >= watch.max_drop
        if 0 <= score <= 1 and 0 <= reference["score"] <= 1:
            n = len(examples)
            result["p_value"] = two_proportions(round(reference["score"] * n), n, round(score * n), n).p
            if watch.reeval_test == "significance":
                fell = drop > 0 and result["p_value"] < watch.alpha
        checks[f"drop from {reference['score']:.4g} below {watch.max_drop:g}"] = not fell
    result["checks"] = checks
    result["alert"] = not all(checks.values())
    if record:
        add_result(reg.db, "reeval", name, str(version.number), result["alert"], result)
    return result


def _reference(reg: Any, name: str, number: int) -> dict[str, Any] | None:
    """The score version `number` of `name` is held to: its gate pass at promotion, else the newest
    re-evaluation of another version of the name; None when neither exists."""
    promoted = [e for e in reg.history(name) if e.version == number and e.details.get("to") == "production"]
    for entry in reversed(promoted):
        gate = entry.details.get("gate")
        if gate and "candidate" in gate.get("scores", {}):
            return {
                "score": gate["scores"]["candidate"]["score"],
                "what": f"its gate pass (audit entry {entry.seq})",
            }
    earlier = [r for r in results(reg.db, name, "reeval") if r.version != str(number)]
    if earlier:
        last = earlier[-1]
        return {"score": last.result["score"], "what": f"the re-evaluation of {name}@{last.version}"}
    return None
