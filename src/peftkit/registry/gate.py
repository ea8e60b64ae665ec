"""The evaluation gate a version passes on its way to production.

Each adapter name has one gate (`Registry.set_gate`): an eval set (a built-in task, or a file the
registry stores by hash), a metric, thresholds (score at least `min_score`, perplexity at most
`max_perplexity`), and a `margin` the candidate may fall behind the current production version by.
Running it (`peftkit.policy`, above the registry) evaluates the base model, the candidate and the
production version in the same mixed batches, and also checks that the candidate changes the base
model's outputs at all: an adapter that loads but does nothing (a no-op) fails. The registry itself
runs nothing: it stores the gate, and checks a result against it before it records a promotion.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RegistryError, RequestError

if TYPE_CHECKING:
    from .store import Registry

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


def gate_checks(
    gate: Gate, metric: str, scores: dict[str, dict[str, float]], changed: bool
) -> dict[str, bool]:
    """Each of the gate's checks with its outcome, from the scores of "candidate", "base" and (when
    there is one) "production", and whether the candidate changed the base model's outputs."""
    cand = scores["candidate"]
    checks = {"changes_the_base_model": changed}
    if gate.min_score is not None:
        checks[f"{metric} >= {gate.min_score:g}"] = cand["score"] >= gate.min_score
    if gate.max_perplexity is not None:
        checks[f"perplexity <= {gate.max_perplexity:g}"] = cand["perplexity"] <= gate.max_perplexity
    if "production" in scores:
        production = scores["production"]["score"]
        checks[f"{metric} >= production's {production:.4g} - margin {gate.margin:g}"] = (
            cand["score"] >= production - gate.margin
        )
    return checks


def check_result(gate: Gate | None, ref: str, result: Any) -> None:
    """Refuse a gate result that is not a pass of `gate` as it is set now: it must have run on the
    gate's eval set (its `data`: a built-in task, or the stored file's content hash), have scored the
    production version exactly when it names one, and the checks the gate's thresholds give for its
    scores must be its checks, all of them holding."""
    if gate is None:
        raise RegistryError(f"{ref} has a gate result but its name has no gate: set one, then promote again")
    try:
        metric, scores, checks = result["metric"], result["scores"], result["checks"]
        expected = gate_checks(gate, metric, scores, bool(checks["changes_the_base_model"]))
        data, production = result["data"], result["production"]
    except (KeyError, TypeError) as e:
        raise RegistryError(f"{ref}'s gate result is malformed (missing {e}); run the gate again") from None
    if data != gate.data:
        raise RegistryError(
            f"{ref}'s gate result is for eval set {data!r}, the gate's is {gate.data!r}: run it again"
        )
    if (production is not None) != ("production" in scores):
        raise RegistryError(f"{ref}'s gate result names production version {production} but scores "
                            f"{'none' if production is not None else 'one'}: run the gate again")  # fmt: skip
    if expected != checks or result.get("passed") is not True or not all(checks.values()):
        raise RegistryError(
            f"{ref}'s gate result is not a pass of its gate as set now (checks {checks}, the gate's "
            f"thresholds give {expected}): run the gate again"
        )


def stored_file(reg: Registry, sha: str, filename: str, what: str) -> Path:
    """A stored file under its own name (data formats are read from the suffix), verified."""
    out = reg.root / "checkouts" / "files" / sha / filename
    reg.blobs.verify(sha, f"{what}: {filename}")
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.link(reg.blobs.path(sha), out)
    return out
