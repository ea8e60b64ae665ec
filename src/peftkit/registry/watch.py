"""What an adapter name is watched for in production, and what the watching found.

Each name may have one `Watch` (`set_watch`, audited as action "watch"): a validity check its outputs
must pass (a regex they must match in full, or a JSON schema they must satisfy), and the thresholds
the monitor alerts at. The monitor (`peftkit.monitor`, above the registry) writes each drift check and
each re-evaluation it runs as a result row (`add_result`); servers export the newest ones as metrics.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import peftkit.registry.audit as audit

from ..errors import RequestError
from .refs import check_name
from .traffic import Db
from .versions import default_user, now

KINDS = ("drift", "reeval", "ab")


@dataclass(frozen=True)
class Watch:
    """The monitoring settings of one adapter name."""

    valid_regex: str | None = None  # an output is valid when the whole of it (stripped) matches
    valid_schema: dict[str, Any] | None = None  # ... or when it parses as JSON that satisfies this schema
    window: int = 200  # live requests per drift window
    psi: float = 0.25  # population stability index at which a distribution has shifted
    alpha: float = 0.01  # significance level of the drift tests (and of the re-evaluation's, if used)
    max_drop: float = 0.05  # re-evaluation: alert when the score falls this far below its reference
    reeval_test: str = (
        "absolute"  # re-evaluation: "absolute" (a drop of max_drop) or "significance" (and p < alpha)
    )
    min_rate_gap: float = (
        0.05  # output rates (empty, refusal, length stop, validity): smallest change that alerts
    )

    def __post_init__(self) -> None:
        if self.valid_regex is not None and self.valid_schema is not None:
            raise RequestError("give a validity regex or a JSON schema, not both")
        if self.valid_regex is not None:
            try:
                re.compile(self.valid_regex)
            except re.error as e:
                raise RequestError(f"the validity regex {self.valid_regex!r} does not compile: {e}") from None
        if self.valid_schema is not None:
            check_schema(self.valid_schema)
        if not isinstance(self.window, int) or self.window < 10:
            raise RequestError(f"window must be at least 10 requests, not {self.window!r}")
        for key in ("psi", "max_drop", "min_rate_gap"):
            if not getattr(self, key) > 0:
                raise RequestError(f"{key} must be above 0, not {getattr(self, key)!r}")
        if self.reeval_test not in ("absolute", "significance"):
            raise RequestError(f"reeval_test must be 'absolute' or 'significance', not {self.reeval_test!r}")
        if not 0 < self.alpha < 0.5:
            raise RequestError(f"alpha must be between 0 and 0.5, not {self.alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Watch:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_schema(schema: Any) -> None:
    """A JSON schema the validity check can use (jsonschema's own check of it)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise RequestError(f"a validity JSON schema must be a JSON object, not {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise RequestError(f"the validity JSON schema is not a valid schema: {e.message}") from None


def set_watch(db: Db, name: str, watch: Watch, *, user: str | None = None) -> Watch:
    """Set what `name` is watched for (replacing what was set), audited."""
    check_name(name)
    with db.transaction(write=True) as tx:
        tx.execute(
            "INSERT INTO watches (name, config) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET config = excluded.config",
            (name, json.dumps(watch.to_dict(), sort_keys=True)),
        )
        audit.append(tx, now(), user or default_user(), "watch", name, None, watch.to_dict())
    return watch


def watch_of(db: Db, name: str) -> Watch | None:
    with db.transaction() as tx:
        row = tx.one("SELECT config FROM watches WHERE name = ?", (name,))
    return Watch.from_dict(json.loads(row[0])) if row else None


def watches(db: Db) -> dict[str, Watch]:
    with db.transaction() as tx:
        rows = tx.execute("SELECT name, config FROM watches ORDER BY name")
    return {name: Watch.from_dict(json.loads(config)) for name, config in rows}


@dataclass(frozen=True)
class Result:
    """One drift check, re-evaluation or A/B decision the monitor ran."""

    id: int
    kind: str
    name: str
    version: str
    at: float
    alert: bool
    result: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_result(db: Db, kind: str, name: str, version: str, alert: bool, result: dict[str, Any]) -> Result:
    """Record a monitor result (now); one that alerts is also an `alert` entry of the audit log, in the
    same transaction, so the log holds every alert beside the changes made about it."""
    if kind not in KINDS:
        raise RequestError(f"a monitor result is one of {', '.join(KINDS)}, not {kind!r}")
    at = time.time()
    text = json.dumps(result, sort_keys=True, allow_nan=False)
    with db.transaction(write=True) as tx:
        tx.execute(
            "INSERT INTO monitor_results (kind, name, version, at, alert, result) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, name, version, at, int(alert), text),
        )
        (rid,) = tx.one("SELECT MAX(id) FROM monitor_results")
        if alert:
            details = {"kind": kind, "result": rid, "version": version, "why": _why(kind, result)}
            audit.append(
                tx, now(), default_user(), "alert", name, int(version) if version.isdigit() else None, details
            )
    return Result(rid, kind, name, version, at, alert, result)


def _why(kind: str, result: dict[str, Any]) -> str:
    """A short reason for an alert's audit entry."""
    if kind == "drift":
        return "drift: " + ", ".join(s["signal"] for s in result.get("signals", []) if s.get("alert"))
    if kind == "reeval":
        return f"re-evaluated {result.get('metric', 'score')} {result.get('score')}"
    return f"A/B decision {result.get('decision')}: {result.get('reason', '')}"


_RESULT_COLUMNS = "id, kind, name, version, at, alert, result"


def _result(row: tuple[Any, ...]) -> Result:
    rid, kind, name, version, at, alert, text = row
    return Result(rid, kind, name, version, at, bool(alert), json.loads(text))


def results(db: Db, name: str | None = None, kind: str | None = None, since: float = 0.0) -> list[Result]:
    """Monitor results since `since`, oldest first (of one name and kind, if given)."""
    where, params = ["at >= ?"], [since]
    for column, value in (("name", name), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    with db.transaction() as tx:
        rows = tx.execute(
            f"SELECT {_RESULT_COLUMNS} FROM monitor_results WHERE {' AND '.join(where)} ORDER BY id",
            tuple(params),
        )
    return [_result(r) for r in rows]


def latest_results(db: Db) -> list[Result]:
    """The newest result of each (kind, name, version)."""
    with db.transaction() as tx:
        rows = tx.execute(
            f"SELECT {_RESULT_COLUMNS} FROM monitor_results WHERE id IN "
            "(SELECT MAX(id) FROM monitor_results GROUP BY kind, name, version) ORDER BY id"
        )
    return [_result(r) for r in rows]
