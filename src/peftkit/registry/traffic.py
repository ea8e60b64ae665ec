"""Production traffic in the registry's database: samples of requests and responses a server captured
(opt-in, `peftkit serve --capture RATE`), and the feedback clients gave on responses.

    add_samples(reg.db, [Sample(...)], max_rows=10_000, max_bytes=50_000_000)
    window = latest_samples(reg.db, "dates", 200)        # the newest 200 of that adapter, oldest first
    put_feedback(reg.db, Feedback(...))                  # one per response: a second one replaces it

The registry stores and reads these rows; it decides nothing about them. What is captured, and how it
is redacted first, is the server's business (`peftkit.serve.capture`); what the rows mean (drift, A/B
decisions) is the monitor's (`peftkit.monitor`). Each adapter name keeps at most `max_rows` samples and
`max_bytes` bytes of them: the oldest go first, in the transaction that adds new ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass, fields
from typing import Any

from .db import Database, PostgresDatabase

Db = Database | PostgresDatabase


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Sample:
    """One choice of one captured response. `name`/`version` are the adapter that served it (version ""
    for an adapter given by directory; for the base model, its served name and ""), `model` what the
    request asked for (a route, an alias, a version reference). `prompt`/`output` are None when text capture is off:
    only their hashes and lengths are kept then."""

    response_id: str
    choice: int
    at: float  # Unix seconds, when the response ended
    name: str
    version: str
    model: str
    tenant: str
    kind: str  # "completion" or "chat"
    prompt: str | None
    output: str | None
    prompt_sha256: str
    output_sha256: str
    prompt_chars: int
    output_chars: int
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    latency: float  # seconds from the request reaching the engine to its last token
    ttft: float | None  # seconds to the first token
    bytes: int  # what the row costs in the rotation's byte budget

    @classmethod
    def of(cls, prompt: str, output: str, *, keep_text: bool, **facts: Any) -> Sample:
        """A sample of (already redacted) `prompt` and `output`; `keep_text=False` keeps only their
        hashes and lengths."""
        size = (len(prompt.encode()) + len(output.encode()) if keep_text else 0) + 256
        return cls(
            prompt=prompt if keep_text else None,
            output=output if keep_text else None,
            prompt_sha256=text_sha256(prompt),
            output_sha256=text_sha256(output),
            prompt_chars=len(prompt),
            output_chars=len(output),
            bytes=size,
            **facts,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_SAMPLE_COLUMNS = ", ".join(f.name for f in fields(Sample))


def add_samples(db: Db, samples: list[Sample], *, max_rows: int, max_bytes: int) -> None:
    """Insert `samples` in one transaction, then drop each touched name's oldest samples beyond
    `max_rows` rows or `max_bytes` bytes (the newest are kept)."""
    if not samples:
        return
    marks = ", ".join("?" * len(fields(Sample)))
    with db.transaction(write=True) as tx:
        for s in samples:
            tx.execute(f"INSERT INTO samples ({_SAMPLE_COLUMNS}) VALUES ({marks})", astuple(s))
        for name in sorted({s.name for s in samples}):
            tx.execute(
                "DELETE FROM samples WHERE id IN (SELECT id FROM (SELECT id, "
                "ROW_NUMBER() OVER (ORDER BY id DESC) AS n, SUM(bytes) OVER (ORDER BY id DESC) AS total "
                "FROM samples WHERE name = ?) AS newest WHERE n > ? OR total > ?)",
                (name, max_rows, max_bytes),
            )


def _samples(rows: list[tuple[Any, ...]]) -> list[Sample]:
    return [Sample(*row[1:]) for row in rows]


def latest_samples(
    db: Db, name: str, n: int, *, version: str | None = None, before_id: int | None = None
) -> list[tuple[int, Sample]]:
    """The newest `n` samples of adapter `name` (of one `version`, if given; older than sample id
    `before_id`, if given), oldest first, each with its row id."""
    where, params = ["name = ?"], [name]
    if version is not None:
        where.append("version = ?")
        params.append(version)
    if before_id is not None:
        where.append("id < ?")
        params.append(before_id)
    with db.transaction() as tx:
        rows = tx.execute(
            f"SELECT id, {_SAMPLE_COLUMNS} FROM samples WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*params, n),
        )
    return [(row[0], Sample(*row[1:])) for row in reversed(rows)]


def samples_between(db: Db, name: str, since: float, until: float | None = None) -> list[Sample]:
    """Every sample of adapter `name` that ended at or after `since` (and before `until`), oldest first."""
    with db.transaction() as tx:
        rows = tx.execute(
            f"SELECT id, {_SAMPLE_COLUMNS} FROM samples WHERE name = ? AND at >= ? AND at < ? ORDER BY id",
            (name, since, until if until is not None else float("inf")),
        )
    return _samples(rows)


def samples_of_response(db: Db, response_id: str) -> list[Sample]:
    """The captured choices of one response ([] when it was not captured)."""
    with db.transaction() as tx:
        rows = tx.execute(
            f"SELECT id, {_SAMPLE_COLUMNS} FROM samples WHERE response_id = ? ORDER BY choice", (response_id,)
        )
    return _samples(rows)


def count_samples(db: Db) -> dict[str, int]:
    """{adapter name: samples stored}."""
    with db.transaction() as tx:
        return dict(tx.execute("SELECT name, COUNT(*) FROM samples GROUP BY name ORDER BY name"))


# -- feedback -------------------------------------------------------------------------------------------
LABELS = ("up", "down", "neutral")


@dataclass(frozen=True)
class Feedback:
    """A client's judgement of one response: `score` in [-1, 1] (a label "up" is 1, "down" -1), and its
    label ("up" above 0, "down" below, "neutral" at 0)."""

    response_id: str
    at: float
    name: str
    version: str
    model: str
    tenant: str
    score: float
    label: str
    comment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def label_of(score: float) -> str:
    return "up" if score > 0 else "down" if score < 0 else "neutral"


_FEEDBACK_COLUMNS = ", ".join(f.name for f in fields(Feedback))


def put_feedback(db: Db, feedback: Feedback) -> Feedback | None:
    """Store `feedback`, replacing an earlier one on the same response; the one it replaced, if any."""
    marks = ", ".join("?" * len(fields(Feedback)))
    updates = ", ".join(f"{f.name} = excluded.{f.name}" for f in fields(Feedback) if f.name != "response_id")
    with db.transaction(write=True) as tx:
        row = tx.one(
            f"SELECT {_FEEDBACK_COLUMNS} FROM feedback WHERE response_id = ?", (feedback.response_id,)
        )
        tx.execute(
            f"INSERT INTO feedback ({_FEEDBACK_COLUMNS}) VALUES ({marks}) "
            f"ON CONFLICT (response_id) DO UPDATE SET {updates}",
            astuple(feedback),
        )
    return Feedback(*row) if row else None


def feedback_of(db: Db, name: str | None = None, since: float = 0.0) -> list[Feedback]:
    """The feedback given since `since` (on adapter `name`'s responses, if given), oldest first."""
    where, params = "at >= ?", (since,)
    if name is not None:
        where, params = "name = ? AND at >= ?", (name, since)
    with db.transaction() as tx:
        rows = tx.execute(f"SELECT {_FEEDBACK_COLUMNS} FROM feedback WHERE {where} ORDER BY id", params)
    return [Feedback(*row) for row in rows]
