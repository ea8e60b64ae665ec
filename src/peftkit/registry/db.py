"""The registry's database: its schema, the migrations that reach it, and transactions.

SQL here is plain and portable (`?` placeholders, TEXT/INTEGER columns), so the same statements run
on SQLite (embedded, the default) and on PostgreSQL (`postgresql://...`, for teams; psycopg). Every
write is one transaction that first takes the database's one writer lock (SQLite: `BEGIN IMMEDIATE`;
PostgreSQL: a transaction-scoped advisory lock), so concurrent writers queue instead of racing.

The schema has a version (`meta.schema_version`). Opening a database applies the migrations above
its version, in one transaction; a database written by a newer peftkit is refused, never changed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import RegistryError

# Each entry takes the schema from version i to i + 1 (MIGRATIONS[0]: an empty database to version 1).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        number INTEGER NOT NULL,
        digest TEXT NOT NULL,
        stage TEXT NOT NULL,
        method TEXT NOT NULL,
        base_model TEXT,
        base_fingerprint TEXT,
        base_quantization TEXT,
        dataset_hash TEXT,
        parent TEXT,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        description TEXT NOT NULL,
        tags TEXT NOT NULL,
        facts TEXT NOT NULL,
        UNIQUE (name, number),
        UNIQUE (name, digest)
    );
    CREATE TABLE version_files (
        version_id INTEGER NOT NULL REFERENCES versions (id),
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (version_id, path)
    );
    CREATE INDEX version_files_by_sha ON version_files (sha256);
    """,
    # 2: the audit log, append-only, each entry chained to the one before by hash (audit.py)
    """
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        who TEXT NOT NULL,
        action TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 3: each adapter name's evaluation gate (gate.py), as JSON
    """
    CREATE TABLE gates (name TEXT PRIMARY KEY, config TEXT NOT NULL);
    """,
    # 4: production monitoring (traffic.py, watch.py): captured traffic samples, feedback on responses,
    # what each adapter name is watched for, and the results of drift checks and re-evaluations.
    # Times are Unix seconds (DOUBLE PRECISION: PostgreSQL's REAL would round them to minutes).
    """
    CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        response_id TEXT NOT NULL,
        choice INTEGER NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        model TEXT NOT NULL,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        prompt TEXT,
        output TEXT,
        prompt_sha256 TEXT NOT NULL,
        output_sha256 TEXT NOT NULL,
        prompt_chars INTEGER NOT NULL,
        output_chars INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        finish_reason TEXT NOT NULL,
        latency DOUBLE PRECISION NOT NULL,
        ttft DOUBLE PRECISION,
        bytes INTEGER NOT NULL
    );
    CREATE INDEX samples_by_name ON samples (name, id);
    CREATE INDEX samples_by_response ON samples (response_id);
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY,
        response_id TEXT NOT NULL UNIQUE,
        at DOUBLE PRECISION NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        model TEXT NOT NULL,
        tenant TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        label TEXT NOT NULL,
        comment TEXT NOT NULL
    );
    CREATE INDEX feedback_by_name ON feedback (name, id);
    CREATE TABLE watches (name TEXT PRIMARY KEY, config TEXT NOT NULL);
    CREATE TABLE monitor_results (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        alert INTEGER NOT NULL,
        result TEXT NOT NULL
    );
    CREATE INDEX monitor_results_by_name ON monitor_results (name, kind, id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def open_database(location: str | Path) -> Database | PostgresDatabase:
    """The registry database at `location`: a `postgresql://` URL, or a SQLite file's path."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(text)
    return Database(Path(location))


class Database:
    """A SQLite registry database; `transaction()` is the only way to read or write."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.migrate()

    def __str__(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"cannot open the registry database {self.path}: {e}") from None
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        """One transaction: committed when the block ends, rolled back on any error."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Transaction(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"the registry database {self.path} failed: {e}") from None
        finally:
            conn.close()

    def tables(self, tx: Transaction) -> set[str]:
        return {r[0] for r in tx.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def ddl(self, statement: str) -> str:
        return statement

    def migrate(self) -> int:
        return migrate(self)


class PostgresDatabase:
    """The same registry database on PostgreSQL (psycopg 3): the same statements, `?` becoming `%s`.

    Each transaction opens its own connection (a few milliseconds): nothing is shared between
    threads or with a forked child, whose inherited socket would otherwise end the parent's session."""

    LOCK = 0x70656674  # the advisory lock every writer takes ("peft")

    def __init__(self, url: str) -> None:
        self.url = url
        self.migrate()

    def __str__(self) -> str:
        return self.url.split("@")[-1].split("?")[0]  # no user, password or parameters in messages

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        try:
            import psycopg
        except ImportError:
            raise RegistryError(
                "a PostgreSQL registry needs the psycopg package: pip install 'psycopg[binary]'"
            ) from None
        try:
            conn = psycopg.connect(self.url)
        except psycopg.Error as e:
            raise RegistryError(f"cannot connect to the registry database {self}: {e}") from None
        try:
            with conn.transaction():
                tx = Transaction(conn, _postgres_sql)
                if write:
                    tx.execute(f"SELECT pg_advisory_xact_lock({self.LOCK})")
                yield tx
        except psycopg.Error as e:
            raise RegistryError(f"the registry database {self} failed: {e}") from None
        finally:
            conn.close()

    def tables(self, tx: Transaction) -> set[str]:
        return {
            r[0] for r in tx.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        }

    def ddl(self, statement: str) -> str:
        """SQLite's rowid key as PostgreSQL's identity column."""
        return statement.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")

    def migrate(self) -> int:
        return migrate(self)


def migrate(db: Database | PostgresDatabase) -> int:
    """Bring the schema to SCHEMA_VERSION (refusing a newer one); return the version found. A database
    already current is only read: opening a registry takes no writer lock."""
    with db.transaction() as tx:
        found = schema_version(tx, db.tables(tx))
    _refuse_newer(db, found)
    if found == SCHEMA_VERSION:
        return found
    with db.transaction(write=True) as tx:
        found = schema_version(tx, db.tables(tx))  # again, under the lock: another process may have done it
        _refuse_newer(db, found)
        for step in MIGRATIONS[found:]:
            for statement in (s.strip() for s in step.split(";")):
                if statement:
                    tx.execute(db.ddl(statement))
        if 0 < found < 2 <= SCHEMA_VERSION:  # versions from before the audit log get their entries now
            import peftkit.registry.audit as audit

            for name, number, digest, who, when in tx.execute(
                "SELECT name, number, digest, created_by, created_at FROM versions ORDER BY id"
            ):
                audit.append(tx, when, who, "register", name, number, {"digest": digest, "migrated": True})
        if found < SCHEMA_VERSION:
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
    return found


def _refuse_newer(db: Database | PostgresDatabase, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise RegistryError(
            f"the registry database {db} has schema version {found}, newer than this peftkit's "
            f"({SCHEMA_VERSION}); upgrade peftkit to use it (nothing was changed)"
        )


class Transaction:
    """Statements within one open transaction. `translate` turns the portable SQL into the driver's
    dialect (PostgreSQL: `%s` placeholders)."""

    def __init__(self, conn: Any, translate: Callable[[str], str] | None = None) -> None:
        self.conn = conn
        self.translate = translate

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(self.translate(sql) if self.translate else sql, params)
        return cursor.fetchall() if cursor.description else []

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None


def _postgres_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def schema_version(tx: Transaction, tables: set[str]) -> int:
    """The database's schema version: 0 for an empty database."""
    if "meta" not in tables:
        if tables:
            raise RegistryError(f"the database holds tables {sorted(tables)} but is no peftkit registry")
        return 0
    row = tx.one("SELECT value FROM meta WHERE key = 'schema_version'")
    return int(row[0]) if row else 0
