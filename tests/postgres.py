"""A real, throwaway PostgreSQL server for tests: one per session, a fresh database per test, never a mock.

`start_server` runs `initdb` and `pg_ctl start` in a new temporary directory that holds the data, the
log and the Unix socket; there is no TCP listener, so parallel sessions never collide on a port.
PostgreSQL refuses to run as root, and CI runs as root: then every binary runs as the `postgres` user
(`runuser`), who owns the directory. The server is stopped (`pg_ctl stop -m immediate`) and the directory
removed by the session fixture's `finally`, again by `atexit` if that never ran, and by a watchdog process
if the test process dies outright (SIGKILL, SIGTERM), so no server outlives its tests.

`postgres_url` gives each test its own empty database as a libpq URL with the socket directory as `host`:
`postgresql://postgres@/test_1?host=/tmp/peftkit-pg-x1y2&port=5432` (psycopg and SQLAlchemy accept it).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"),)  # Debian/Ubuntu's postgresql-15 (not on PATH)
TOOLS = ("initdb", "pg_ctl", "postgres")
INSTALL = "install PostgreSQL 15's server: `apt-get install postgresql-15` (Debian/Ubuntu)"
SUPERUSER = "postgres"  # the database role the URLs log in as (trust auth on the socket: no password)
PORT = 5432  # names the socket file (.s.PGSQL.5432) in our private directory; no TCP port is opened
# Speed over durability: the data dies with the session anyway.
SETTINGS = {
    "listen_addresses": "''",
    "port": str(PORT),
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
}
# --no-sync: initdb skips fsync (seconds on a busy disk); trust: the socket is in a directory only we reach.
INITDB_ARGS = (f"--username={SUPERUSER}", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
               "--no-instructions")  # fmt: skip

# Runs beside the tests; its stdin is a pipe from the test process, so reading it returns once that
# process exits for any reason. Then it stops the server (a no-op if already stopped) and removes the dir.
_WATCHDOG = """
import shutil, subprocess, sys
sys.stdin.read()
subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


@dataclass
class Server:
    """A running throwaway server: `base` holds `data/`, `server.log` and the socket."""

    base: Path
    bin_dir: Path
    os_user: str | None  # run the binaries as this user (when we are root); None: as ourselves
    watchdog: subprocess.Popen | None = None
    stopped: bool = False
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for `dbname` over the Unix socket in `base`."""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={quote(str(self.base), safe='/')}&port={PORT}"

    def command(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self.os_user, "--", *cmd] if self.os_user else cmd


def find_bin_dir(candidates: Sequence[Path] = BIN_DIRS) -> Path:
    """The first of `candidates`, then the directory of `pg_ctl` on PATH, that has every tool in `TOOLS`."""
    on_path = shutil.which("pg_ctl")
    dirs = [*candidates, *([Path(on_path).resolve().parent] if on_path else [])]
    for d in dirs:
        if all((d / tool).is_file() for tool in TOOLS):
            return d
    looked = ", ".join(str(d) for d in dirs) or "nowhere"
    raise RuntimeError(
        f"PostgreSQL server binaries ({', '.join(TOOLS)}) not found (looked in {looked} and on PATH); "
        f"the database tests need a real server: {INSTALL}"
    )


def _os_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise RuntimeError(
            f"running as root, so PostgreSQL must run as the '{SUPERUSER}' user, and there is none; {INSTALL} "
            "(it creates that user) or `useradd --system postgres`"
        ) from None
    return SUPERUSER


def _run(server: Server, tool: str, *args: str, timeout: float = 900) -> None:
    proc = subprocess.run(
        server.command(tool, *args), cwd=server.base, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        log = server.log.read_text()[-2000:] if server.log.exists() else ""
        raise RuntimeError(
            f"{' '.join(server.command(tool, *args))} failed ({proc.returncode}):\n{proc.stderr}{log}"
        )


def start_server(bin_dir: Path | None = None) -> Server:
    """initdb + start a server in a new temp dir; stopped by `stop_server`, at exit, or by the watchdog."""
    bin_dir = bin_dir or find_bin_dir()
    os_user = _os_user()
    # Under the system temp dir, not pytest's (0700 and root's): the postgres user must reach it, and a
    # socket path must stay under ~100 bytes.
    base = Path(tempfile.mkdtemp(prefix="peftkit-pg-"))
    if os_user:
        entry = pwd.getpwnam(os_user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    server = Server(base=base, bin_dir=bin_dir, os_user=os_user)
    atexit.register(stop_server, server)
    server.watchdog = _start_watchdog(server)
    try:
        _run(server, "initdb", "-D", str(server.data_dir), *INITDB_ARGS)
        settings = [f"{key} = {value}" for key, value in SETTINGS.items()]
        settings.append(f"unix_socket_directories = '{base}'")
        with open(server.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n".join(settings) + "\n")
        _run(server, "pg_ctl", "start", "-D", str(server.data_dir), "-l", str(server.log), "-w", "-t", "30")
    except BaseException:
        stop_server(server)
        raise
    return server


def _start_watchdog(server: Server) -> subprocess.Popen:
    stop = server.command("pg_ctl", "stop", "-D", str(server.data_dir), "-m", "immediate")
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(server.base), *stop],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the terminal's process group must not kill it first
    )


def stop_server(server: Server) -> None:
    """Stop the server at once (`-m immediate`: no checkpoint, nothing to keep) and remove its directory.
    Idempotent: the fixture, `atexit` and a failed start may all call it."""
    if server.stopped:
        return
    server.stopped = True
    if (server.data_dir / "postmaster.pid").exists():
        # On failure this raises, and the watchdog tries again once this process exits.
        _run(server, "pg_ctl", "stop", "-D", str(server.data_dir), "-m", "immediate", "-w")
    shutil.rmtree(server.base, ignore_errors=True)
    if server.watchdog is not None:  # nothing left for it to do
        server.watchdog.kill()
        server.watchdog.wait()


def _admin(server: Server, statement: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


def create_database(server: Server, name: str | None = None) -> str:
    """Create an empty database (`test_<n>` unless named) and return its name; `server.url(name)` reaches it."""
    name = name or f"test_{next(server._names)}"
    _admin(server, "CREATE DATABASE {}", name)
    return name


def drop_database(server: Server, name: str) -> None:
    """Drop `name`, closing any connection a test left open (FORCE, PostgreSQL 13+)."""
    _admin(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """One real PostgreSQL server for the session; fails (never skips) when PostgreSQL is not installed."""
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def postgres_url(postgres_server: Server) -> Iterator[str]:
    """A fresh, empty database for this test, dropped afterwards: `postgresql://postgres@/test_<n>?host=...`."""
    name = create_database(postgres_server)
    try:
        yield postgres_server.url(name)
    finally:
        drop_database(postgres_server, name)
