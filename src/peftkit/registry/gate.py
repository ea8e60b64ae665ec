"""The evaluation gate a version passes on its way to production.

Each adapter name has one gate (`Registry.set_gate`): an eval set (a built-in task, or a file the
registry stores by hash), a metric, thresholds (score at least `min_score`, perplexity at most
`max_perplexity`), and a `margin` the candidate may fall behind the current production version by.
Running it evaluates the base model, the candidate and the production version in the same mixed
batches (peftkit's eval code), and also checks that the candidate changes the base model's outputs
at all: an adapter that loads but does nothing (a no-op) fails.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BaseModelMismatchError, RegistryError, RequestError

if TYPE_CHECKING:
    from .store import Registry
    from .versions import Version

NO_OP_TOLERANCE = 1e-6  # relative perplexity change below which identical answers mean "no effect"
STORED = "stored:sha256:"  # a gate's eval file, kept in the registry by hash: stored:sha256:<hex>/<name>


@dataclass(frozen=True)
class Gate:
    """What a version must meet to reach production."""

    data: str  # task:NAME[:SPLIT], or the path of the stored eval file
    metric: str = "auto"
    n: int = 100
    min_score: float | None = None
    max_perplexity: float | None = None
    margin: float = 0.0  # how far below the production version's score the candidate may be
    base: str | None = None  # the base model to evaluate on (default: the one the version records)
    max_new_tokens: int = 0  # per answer; 0 = as `peftkit eval` does: the task's, or the longest answer + 8

    def __post_init__(self) -> None:
        if self.n < 1:
            raise RequestError(f"gate n must be at least 1, not {self.n}")
        if self.max_new_tokens < 0:
            raise RequestError(f"gate max_new_tokens must be >= 0 (0 = auto), not {self.max_new_tokens}")
        if self.margin < 0:
            raise RequestError(
                f"gate margin must be >= 0 (how far the candidate may fall behind), not {self.margin}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_gate(gate: Gate, base: str, candidate: Path, production: Path | None) -> dict[str, Any]:
    """Evaluate and decide. Returns the result (stored with the promotion): each model's score and
    perplexity, the checks with their outcome, and `passed`."""
    from ..data.source import load_data, parse_task_spec
    from ..eval.loading import longest_answer, warnings_as_notes
    from ..eval.passes import open_side_by_side

    task = parse_task_spec(gate.data, "test")
    examples = load_data(gate.data, split="test", n=gate.n)
    metric = gate.metric if gate.metric != "auto" else task[0].metric if task else "exact_match"
    adapters = [("candidate", candidate)] + ([("production", production)] if production else [])
    with warnings_as_notes():  # a candidate of another method than production's: a pass of its own
        side = open_side_by_side(base, adapters, "auto")
        max_new = gate.max_new_tokens or (
            task[0].max_new_tokens if task else longest_answer(side.tokenizer, examples) + 8
        )  # the same rule as `peftkit eval`, so both score a file alike
        report = side.evaluate(
            examples, metric=metric, max_new_tokens=max_new, with_perplexity=True, samples=0
        )
    scores = {r.adapter: {"score": r.score, "perplexity": r.perplexity} for r in report.results}
    cand, plain = report["candidate"], report["base"]
    changed = (
        cand.predictions != plain.predictions
        or abs(cand.perplexity - plain.perplexity) > NO_OP_TOLERANCE * plain.perplexity
    )
    checks = {"changes_the_base_model": changed}
    if gate.min_score is not None:
        checks[f"{metric} >= {gate.min_score:g}"] = cand.score >= gate.min_score
    if gate.max_perplexity is not None:
        checks[f"perplexity <= {gate.max_perplexity:g}"] = cand.perplexity <= gate.max_perplexity
    if production is not None:
        floor = report["production"].score - gate.margin
        checks[f"{metric} >= production's {report['production'].score:.4g} - margin {gate.margin:g}"] = (
            cand.score >= floor
        )
    return {
        "metric": metric,
        "n": len(examples),
        "max_new_tokens": max_new,
        "scores": scores,
        "checks": checks,
        "passed": all(checks.values()),
    }


def pass_gate(reg: Registry, version: Version) -> dict[str, Any]:
    """Run `version`'s gate against the base model and the current production version: the result, or a
    RegistryError listing what failed (nothing changes)."""
    gate = reg.gate(version.name)
    if gate is None:
        raise RegistryError(
            f"{version.name!r} has no evaluation gate, which promotion to production runs: set one with "
            f"`peftkit registry gate {version.name} task:NAME --min-score X`, or promote with --force "
            "(recorded in the audit log)"
        )
    base = gate.base or version.base_model
    if not base:
        raise RegistryError(
            f"{version.ref} does not record its base model: give the gate one, "
            f"`peftkit registry gate {version.name} DATA --base BASE`"
        )
    data = gate.data
    if data.startswith(STORED):
        sha, _, filename = data.removeprefix(STORED).partition("/")
        data = str(_stored_file(reg, sha, filename, f"{version.name}'s gate data"))
    current = [v for v in reg.versions(version.name) if v.stage == "production"]
    production = reg.resolve(current[0].ref) if current else None  # damaged: an error, not "none"
    try:
        result = run_gate(replace(gate, data=data), base, reg.resolve(version.ref), production)
    except BaseModelMismatchError:  # its advice (--no-check-base) is not promote's to take
        scored = [version, *current]
        records = "; ".join(f"{v.ref} records {v.base_model or 'no base name'}" for v in scored)
        raise RegistryError(
            f"the gate of {version.name!r} runs on base model {base!r}, and a version it scores was trained "
            f"on another ({records}): give the gate that version's base, "
            f"`peftkit registry gate {version.name} DATA --base BASE`"
        ) from None
    result["production"] = current[0].number if current else None  # the promotion checks it is still so
    if not result["passed"]:
        failed = [check for check, ok in result["checks"].items() if not ok]
        raise RegistryError(
            f"{version.ref} failed its evaluation gate ({'; '.join(failed)}); scores: {result['scores']}. "
            "Nothing changed; --force promotes anyway (recorded in the audit log)"
        )
    return result


def _stored_file(reg: Registry, sha: str, filename: str, what: str) -> Path:
    """A stored file under its own name (data formats are read from the suffix), verified."""
    out = reg.root / "checkouts" / "files" / sha / filename
    reg.blobs.verify(sha, f"{what}: {filename}")
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.link(reg.blobs.path(sha), out)
    return out
