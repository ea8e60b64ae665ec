"""The throwaway PostgreSQL server (tests/postgres.py): real rows, a database per test, concurrent writers,
and no server left behind, whether the session ends cleanly or is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from postgres import Server, create_database, drop_database, find_bin_dir, start_server, stop_server

SEEN_DATABASES: set[str] = set()


def test_url_round_trips_rows(postgres_url: str):
    assert postgres_url.startswith("postgresql://postgres@/test_")
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE adapters (id serial PRIMARY KEY, name text NOT NULL, rank int)")
        conn.cursor().executemany(
            "INSERT INTO adapters (name, rank) VALUES (%s, %s)", [("lora-a", 8), ("dora-b", 16)]
        )
    with psycopg.connect(postgres_url) as conn:  # a new connection: the rows were committed
        rows = conn.execute("SELECT name, rank FROM adapters ORDER BY id").fetchall()
    assert rows == [("lora-a", 8), ("dora-b", 16)]


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_its_own_empty_database(postgres_url: str, run: str):
    with psycopg.connect(postgres_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        conn.execute("CREATE TABLE leftover (run text)")  # the other run must not see it
        conn.execute("INSERT INTO leftover VALUES (%s)", (run,))
    assert tables == []
    assert name not in SEEN_DATABASES
    SEEN_DATABASES.add(name)


def test_dropped_database_is_gone(postgres_server: Server):
    name = create_database(postgres_server)
    open_conn = psycopg.connect(postgres_server.url(name))  # left open: the drop must still succeed
    drop_database(postgres_server, name)
    open_conn.close()
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(postgres_server.url(name))


def _write_while_other_writes(url: str, who: str, inserted, committed, seen) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO writes (who) VALUES (%s)", (who,))
        inserted.wait(timeout=900)  # both transactions now hold an uncommitted row
        count = conn.execute("SELECT count(*) FROM writes").fetchone()[0]
        committed.wait(timeout=900)
        seen.put((who, count))
    # leaving the `with` commits


def test_two_processes_commit_concurrently(postgres_url: str):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE writes (who text PRIMARY KEY)")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's threads
    inserted, committed, seen = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_write_while_other_writes, args=(postgres_url, who, inserted, committed, seen))
        for who in ("a", "b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    assert [p.exitcode for p in procs] == [0, 0]
    # Read committed: neither saw the other's row before the commits, both rows are there after.
    assert sorted(seen.get(timeout=5) for _ in procs) == [("a", 1), ("b", 1)]
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT who FROM writes ORDER BY who").fetchall() == [("a",), ("b",)]


def test_missing_binaries_fail_naming_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"not found .*apt-get install postgresql-15"):
        find_bin_dir([tmp_path])


def _running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _postmaster_pid(server: Server) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().split()[0])


def test_stop_server_leaves_nothing():
    server = start_server()
    pid = _postmaster_pid(server)
    assert _running(pid)
    stop_server(server)
    stop_server(server)  # idempotent: the fixture and atexit may both call it
    assert not _running(pid)
    assert not server.base.exists()
    assert server.watchdog is not None and server.watchdog.poll() is not None


def test_killed_session_leaves_no_server():
    """SIGKILL skips `finally` and atexit; the watchdog still stops the server and removes its dir."""
    script = (
        "import os, signal, postgres\n"
        "s = postgres.start_server()\n"
        "print(s.base, int((s.data_dir / 'postmaster.pid').read_text().split()[0]), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    base, pid = proc.stdout.split()
    deadline = time.monotonic() + 900  # a hang guard: the watchdog's cleanup may be slow on a busy machine
    while (Path(base).exists() or _running(int(pid))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(int(pid))
    assert not Path(base).exists()
