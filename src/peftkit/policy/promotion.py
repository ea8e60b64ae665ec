"""Promotion with an evaluation gate: evaluate the candidate beside the base model and the production
version, then hand the result to the registry, which checks it against the gate and records it.

    from peftkit.policy import promote
    promote(Registry.open(), "support-bot@3", "production")   # runs the gate; force=True skips it
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BaseModelMismatchError, RegistryError
from ..registry.gate import NO_OP_TOLERANCE, STORED, Gate, gate_checks, stored_file
from ..registry.store import Registry
from ..registry.versions import Version


def promote(
    reg: Registry, ref: str, to: str, *, user: str | None = None, force: bool = False, reason: str = ""
) -> Version:
    """Move a version up a stage (`Registry.promote`); to production, first pass the name's evaluation
    gate, whose result the registry checks and stores with the promotion. `force=True` skips the gate
    (the audit log records that)."""
    if to != "production" or force:
        return reg.promote(ref, to, user=user, force=force, reason=reason)
    version = reg.check_promotion(ref, to)  # a staging/draft version, before minutes of evaluation
    return reg.promote(ref, to, user=user, reason=reason, gate_result=pass_gate(reg, version))


def pass_gate(reg: Registry, version: Version) -> dict[str, Any]:
    """Run `version`'s gate against the base model and the current production version: the result, or a
    RegistryError listing what failed (nothing changes)."""
    gate = reg.require_gate(version.name)
    base = gate.base or version.base_model
    if not base:
        raise RegistryError(
            f"{version.ref} does not record its base model: give the gate one, "
            f"`peftkit registry gate {version.name} DATA --base BASE`"
        )
    readable = gate_data(reg, gate, f"{version.name}'s gate data")
    current = [v for v in reg.versions(version.name) if v.stage == "production"]
    production = reg.resolve(current[0].ref) if current else None  # damaged: an error, not "none"
    try:
        result = run_gate(readable, base, reg.resolve(version.ref), production)
    except BaseModelMismatchError:  # its advice (--no-check-base) is not promote's to take
        scored = [version, *current]
        records = "; ".join(f"{v.ref} records {v.base_model or 'no base name'}" for v in scored)
        raise RegistryError(
            f"the gate of {version.name!r} runs on base model {base!r}, and a version it scores was trained "
            f"on another ({records}): give the gate that version's base, "
            f"`peftkit registry gate {version.name} DATA --base BASE`"
        ) from None
    result["production"] = current[0].number if current else None  # the promotion checks it is still so
    result["data"] = gate.data  # the eval set it ran on, as the gate names it (a task, or a content hash)
    if not result["passed"]:
        failed = [check for check, ok in result["checks"].items() if not ok]
        raise RegistryError(
            f"{version.ref} failed its evaluation gate ({'; '.join(failed)}); scores: {result['scores']}. "
            "Nothing changed; --force promotes anyway (recorded in the audit log)"
        )
    return result


def run_gate(gate: Gate, base: str, candidate: Path, production: Path | None) -> dict[str, Any]:
    """Evaluate and decide. Returns the result (stored with the promotion): each model's score and
    perplexity, the checks with their outcome, and `passed`."""
    adapters = [("candidate", candidate)] + ([("production", production)] if production else [])
    metric, examples, max_new, report = evaluate_on_gate(gate, base, adapters)
    scores = {r.adapter: {"score": r.score, "perplexity": r.perplexity} for r in report.results}
    cand, plain = report["candidate"], report["base"]
    changed = (
        cand.predictions != plain.predictions
        or abs(cand.perplexity - plain.perplexity) > NO_OP_TOLERANCE * plain.perplexity
    )
    checks = gate_checks(gate, metric, scores, changed)
    return {
        "metric": metric,
        "n": len(examples),
        "max_new_tokens": max_new,
        "scores": scores,
        "checks": checks,
        "passed": all(checks.values()),
    }


def evaluate_on_gate(gate: Gate, base: str, adapters: list[tuple[str, Path]]) -> tuple[str, list, int, Any]:
    """The base model and each (name, directory) of `adapters` scored on the gate's eval set (its `data`
    a task or a readable file), side by side: (metric, examples, max_new_tokens, the EvalReport)."""
    from ..data.source import load_data, parse_task_spec
    from ..eval.loading import longest_answer, warnings_as_notes
    from ..eval.passes import open_side_by_side

    task = parse_task_spec(gate.data, "test")
    examples = load_data(gate.data, split="test", n=gate.n)
    metric = gate.metric if gate.metric != "auto" else task[0].metric if task else "exact_match"
    with warnings_as_notes():  # a candidate of another method than production's: a pass of its own
        side = open_side_by_side(base, adapters, "auto")
        max_new = gate.max_new_tokens or (
            task[0].max_new_tokens if task else longest_answer(side.tokenizer, examples) + 8
        )  # the same rule as `peftkit eval`, so both score a file alike
        report = side.evaluate(
            examples, metric=metric, max_new_tokens=max_new, with_perplexity=True, samples=0
        )
    return metric, examples, max_new, report


def gate_data(reg: Registry, gate: Gate, what: str) -> Gate:
    """`gate` with its data readable here: a stored eval file becomes the path of its verified copy."""
    if not gate.data.startswith(STORED):
        return gate
    sha, _, filename = gate.data.removeprefix(STORED).partition("/")
    return replace(gate, data=str(stored_file(reg, sha, filename, what)))
