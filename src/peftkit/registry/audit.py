"""The registry's audit log: every change, append-only, each entry chained to the one before.

An entry's hash is sha256 over the previous entry's hash and the entry's own canonical JSON, so an
entry edited or deleted afterwards breaks the chain from there on, and `check` finds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: db imports this module to migrate old registries
    from .db import Transaction

GENESIS = "0" * 64
_FIELDS = "seq, at, who, action, name, version, details, prev_hash, hash"


@dataclass(frozen=True)
class Entry:
    """One audited change: who did what to which version, when, and the facts of it."""

    seq: int
    when: str  # UTC, ISO 8601
    who: str
    action: str  # register, promote, demote, rollback, ...
    name: str
    version: int | None
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def entry_hash(
    prev_hash: str, at: str, who: str, action: str, name: str, version: int | None, details: str
) -> str:
    body = json.dumps([at, who, action, name, version, details], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def append(
    tx: Transaction, at: str, who: str, action: str, name: str, version: int | None, details: dict[str, Any]
) -> Entry:
    """Add an entry inside the caller's transaction (the change and its record commit together)."""
    last = tx.one("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1")
    prev = last[0] if last else GENESIS
    text = json.dumps(details, sort_keys=True, ensure_ascii=False)
    digest = entry_hash(prev, at, who, action, name, version, text)
    tx.execute(
        "INSERT INTO audit (at, who, action, name, version, details, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (at, who, action, name, version, text, prev, digest),
    )
    seq = tx.one("SELECT seq FROM audit WHERE hash = ?", (digest,))[0]
    # The head is kept apart from the chain, so removing the newest entries is found too.
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('audit_head', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (digest,),
    )
    return Entry(seq, at, who, action, name, version, details, prev, digest)


def entries(tx: Transaction, name: str | None = None) -> list[Entry]:
    """The log in order (of `name` only, if given)."""
    where, params = ("WHERE name = ?", (name,)) if name else ("", ())
    rows = tx.execute(f"SELECT {_FIELDS} FROM audit {where} ORDER BY seq", params)
    return [Entry(*r[:6], json.loads(r[6]), r[7], r[8]) for r in rows]


def broken_links(tx: Transaction) -> list[str]:
    """Every place the chain does not hold: an entry edited, removed or inserted after the fact."""
    problems, prev = [], GENESIS
    for r in tx.execute(f"SELECT {_FIELDS} FROM audit ORDER BY seq"):
        seq, at, who, action, name, version, details, prev_hash, digest = r
        if prev_hash != prev:
            problems.append(
                f"audit entry {seq} ({action} {name}) does not follow the entry before it: one was removed or inserted"
            )
        elif entry_hash(prev, at, who, action, name, version, details) != digest:
            problems.append(f"audit entry {seq} ({action} {name}) was changed after it was written")
        prev = digest
    head = tx.one("SELECT value FROM meta WHERE key = 'audit_head'")
    if (head[0] if head else GENESIS) != prev:
        problems.append("the newest audit entries were removed (the log ends before its recorded head)")
    return problems
