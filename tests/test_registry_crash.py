"""Crash safety and concurrency of the registry's writes, on both backends (SQLite, and a real PostgreSQL
server). A writer SIGKILLed just before each of its steps in turn (the file-system calls that make a write
durable, SQL statements, commits) leaves a sound registry with its write done whole or not at all; several
writers at once lose, duplicate and corrupt nothing; two promotions that reach the write together are
serialised, the loser getting a clear conflict error. Writers are forked from the test process (a kill
point costs tens of milliseconds); step counting and synchronisation points are patched into the forked
child only, around the real registry code."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import test_registry
from test_registry import saved_adapter

from peftkit.cli import main
from peftkit.errors import RegistryError
from peftkit.registry import Registry, db
from peftkit.registry.bundle import export_bundle, import_bundle

location = test_registry.location  # the fixture: a SQLite registry, or one on a real PostgreSQL server
FORK = multiprocessing.get_context("fork")
# The steps a writer can be killed before: what makes a file durable or moves it, and every SQL statement.
FS_STEPS = ("replace", "rename", "link", "fsync", "unlink", "mkdir", "makedirs")
TIMEOUT = 900  # seconds: a hung writer fails its test instead of hanging the run (never a slow one)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    """Twelve tiny LoRA adapters with distinct weights (one config file for all), built before any fork."""
    root = tmp_path_factory.mktemp("adapters")
    return [saved_adapter(root / f"a{i}", seed=i) for i in range(12)]


@pytest.fixture(scope="module")
def bundles(adapters, tmp_path_factory) -> list[tuple[Path, str]]:
    """Bundles from another registry, with their digests: bot@1 (adapter 2), imp@1..3 (adapters 9-11)."""
    root = tmp_path_factory.mktemp("source")
    source = Registry.open(root / "reg")
    versions = [source.register("bot", adapters[2])]
    versions += [source.register("imp", adapters[9 + i]) for i in range(3)]
    return [(export_bundle(source, v.ref, root / f"{v.name}{v.number}.tar"), v.digest) for v in versions]


# -- running writers in forked processes --------------------------------------------------------------
def _in_processes(calls: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run each `target(*args)` in its own forked process, all at once; each one's return value, or the
    exception it raised."""
    out = FORK.Queue()

    def child(i: int, target: Callable[..., Any], args: tuple) -> None:
        try:
            out.put((i, target(*args)))
        except Exception as e:
            out.put((i, e))

    procs = [FORK.Process(target=child, args=(i, *call)) for i, call in enumerate(calls)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=TIMEOUT) for _ in procs)
    for p in procs:
        p.join(TIMEOUT)
    return [results[i] for i in range(len(calls))]


def _count_steps(kill_at: int, database: type) -> Callable[[], int]:
    """In a forked writer: make every step (FS_STEPS, SQL statements, and the end of a write transaction
    just before it commits) count, and SIGKILL this process just before its `kill_at`-th (0: never).
    Returns the step itself (it returns the count so far)."""
    taken = 0

    def step() -> int:
        nonlocal taken
        taken += 1
        if taken == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return taken

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            step()
            return real(*args, **kwargs)

        return wrapper

    def committing(real: Callable[..., Any]) -> Callable[..., Any]:
        @contextmanager
        def transaction(self: Any, write: bool = False) -> Iterator[Any]:
            with real(self, write) as tx:
                yield tx
                if write:
                    step()  # every statement ran; the commit comes next

        return transaction

    for name in FS_STEPS:
        setattr(os, name, counted(getattr(os, name)))
    for cls in (db.Transaction, *db.Transaction.__subclasses__()):  # both backends' statements
        if "execute" in cls.__dict__:
            cls.execute = counted(cls.__dict__["execute"])
    database.transaction = committing(database.transaction)
    return step


def _write(location: str, run: Callable[[Registry], Any], kill_at: int) -> tuple[int | None, int | None]:
    """Run `run` in a forked writer killed just before its `kill_at`-th step; its exit code, and (if
    it was not killed) its number of steps, the last one being "after the operation's last commit"."""
    receive, send = FORK.Pipe(duplex=False)

    def writer() -> None:
        reg = Registry.open(location)
        step = _count_steps(kill_at, type(reg.db))
        run(reg)
        send.send(step())  # a kill here is a crash just after the last commit

    p = FORK.Process(target=writer)
    p.start()
    p.join(TIMEOUT)
    p.kill()  # a no-op unless it hung
    return p.exitcode, receive.recv() if receive.poll() else None


# -- a registry's state, kept and put back --------------------------------------------------------------
@contextmanager
def kept_state(location: str, copy: Path) -> Iterator[Callable[[], None]]:
    """Keep the registry as it is now, and yield a function that puts it back: its files (the SQLite
    database among them), and on PostgreSQL every table's rows, kept in a schema of their own."""
    reg = Registry.open(location)
    with reg.db.transaction() as tx:
        tables = sorted(reg.db.tables(tx))
    shutil.copytree(reg.root, copy)
    postgres = location.startswith("postgresql://")
    if postgres:
        _sql(reg.db.url, "CREATE SCHEMA kept", *(f"CREATE TABLE kept.{t} AS TABLE {t}" for t in tables))

    def restore() -> None:
        shutil.rmtree(reg.root)
        shutil.copytree(copy, reg.root)
        if postgres:  # foreign keys unchecked while the rows go back in, whatever the tables' order
            _sql(reg.db.url, "SET LOCAL session_replication_role = replica", f"TRUNCATE {', '.join(tables)}",
                 *(f"INSERT INTO {t} SELECT * FROM kept.{t}" for t in tables))  # fmt: skip

    yield restore


def _sql(url: str, *statements: str) -> None:
    """Run statements on a PostgreSQL database in one transaction."""
    import psycopg

    with psycopg.connect(url) as conn:
        for statement in statements:
            conn.execute(statement)


def state(reg: Registry) -> tuple:
    """What a write changes in the database: every version's stage and digest, every audit entry."""
    versions = tuple((v.ref, v.stage, v.digest) for v in reg.versions())
    log = tuple((e.action, e.name, e.version, e.details.get("to")) for e in reg.history())
    return versions, log


def stored(reg: Registry) -> tuple:
    """What a write changes on disk: the stored files, and the checkouts of versions no longer there."""
    live = {v.digest for v in reg.versions()}
    checkouts = reg.root / "checkouts"
    stale = {p.name for p in checkouts.iterdir() if p.name not in live} if checkouts.is_dir() else set()
    return set(reg.blobs.all()), stale - {"files"}


def assert_sound(reg: Registry, when: str = "") -> None:
    """The registry checks sound, every version resolves to verified files, and version numbers were
    each given once, in order (1..n per name, by the log), with every version holding one of them."""
    assert reg.check() == [], when
    given: dict[str, list[int]] = {}
    for e in reg.history():
        if e.action == "register":
            given.setdefault(e.name, []).append(e.version)
    assert all(numbers == list(range(1, len(numbers) + 1)) for numbers in given.values()), given
    for v in reg.versions():
        assert v.number in given[v.name] and reg.resolve(v.ref).is_dir()


# -- 1. a writer killed before any one of its steps -----------------------------------------------------
def crash_ops(a: list[Path], bundle: Path) -> dict[str, tuple[Callable, Callable]]:
    """Each operation under test: (the registry it starts from, the write), as functions of a registry."""

    def two(reg: Registry) -> None:
        reg.register("bot", a[0])
        reg.register("bot", a[1])
        reg.resolve("bot@2")  # a checkout, for delete to leave behind and gc to remove

    def released(reg: Registry) -> None:
        two(reg)
        reg.promote("bot@1", "production", force=True)

    def deleted(reg: Registry) -> None:
        two(reg)
        reg.delete("bot@2")

    return {
        "register": (lambda reg: reg.register("bot", a[0]), lambda reg: reg.register("bot", a[1])),
        "promote": (released, lambda reg: reg.promote("bot@2", "production", force=True)),
        "rollback": (
            lambda reg: (released(reg), reg.promote("bot@2", "production", force=True)),
            lambda reg: reg.rollback("bot"),
        ),
        "delete": (two, lambda reg: reg.delete("bot@2")),
        "gc": (deleted, lambda reg: reg.gc(grace=0)),
        "import": (lambda reg: reg.register("bot", a[0]), lambda reg: import_bundle(reg, bundle)),
    }


@pytest.mark.parametrize("op", ["register", "promote", "rollback", "delete", "gc", "import"])
def test_a_writer_killed_before_any_of_its_steps_leaves_the_registry_sound(
    op, location, adapters, bundles, tmp_path
) -> None:
    """For every step k of the operation (each os.replace/rename/link/fsync/unlink/mkdir, SQL statement
    and commit, and the end), a writer SIGKILLed just before step k leaves a registry that checks sound
    (`peftkit registry check` exits 0), every committed version there and resolving, the operation done
    whole or not at all (versions, stages and audit log as before or as after a complete run), and
    nothing that keeps the operation from then running to the same end."""
    setup, run = crash_ops(adapters, bundles[0][0])[op]
    reg = Registry.open(location)
    setup(reg)
    before = state(reg)
    with kept_state(location, tmp_path / "kept") as restore:
        code, steps = _write(location, run, kill_at=0)
        assert code == 0 and steps, f"the writer that is never killed failed ({code})"
        after, files_after = state(reg), stored(reg)
        assert (after != before) == (op != "gc")  # gc changes files only
        for k in range(1, steps + 1):
            restore()
            code, _ = _write(location, run, kill_at=k)
            assert code == -signal.SIGKILL, f"{op}: the writer to be killed at step {k} exited {code}"
            reg = Registry.open(location)
            assert_sound(reg, f"{op} killed before step {k} of {steps}")
            if k == steps // 2:
                assert main(["registry", "check", "--registry", location]) == 0
            now = state(reg)
            assert now in (before, after), f"{op} killed before step {k} of {steps}: half done"
            if now == before:
                run(reg)
            assert (state(reg), stored(reg)) == (after, files_after), f"{op} after a kill at step {k}"


# -- 2. several writers at once -----------------------------------------------------------------------
def _mixed_writer(location: str, mine: list[Path], bundle: Path, user: str, start: Any) -> dict[str, Any]:
    """One of several writers at once: register three versions of bot, collect garbage, move the second
    up and back down, force the first into production, delete the third, import a bundle."""
    start.wait(TIMEOUT)
    reg = Registry.open(location)
    first, second, third = (reg.register("bot", d, user=user).ref for d in mine)
    collected = reg.gc()  # default grace: what the others are registering is too young to collect
    reg.promote(second, "staging", user=user)
    reg.demote(second, "draft", user=user)
    reg.promote(first, "production", force=True, user=user)
    reg.delete(third, user=user)
    imported = import_bundle(reg, bundle, user=user)
    return {"refs": [first, second, third], "gc": collected, "imported": (imported.ref, imported.digest)}


def test_several_writers_at_once_lose_duplicate_and_corrupt_nothing(location, adapters, bundles) -> None:
    """Three processes at once register, gc, promote, demote, delete and import: every change each
    reports is in the registry and in its log exactly once, version numbers are 1..n with no gap or
    duplicate, one version is in production (the last one promoted there), and the registry is sound."""
    Registry.open(location)  # created before the writers race
    start = FORK.Barrier(3)
    mine = [(location, adapters[3 * i : 3 * i + 3], bundles[1 + i][0], f"w{i}", start) for i in range(3)]
    done = _in_processes([(_mixed_writer, args) for args in mine])
    assert all(isinstance(d, dict) for d in done), done
    reg = Registry.open(location)
    assert_sound(reg)
    refs = [d["refs"] for d in done]
    assert sorted(int(r.split("@")[1]) for rs in refs for r in rs) == list(range(1, 10))
    stages = {v.ref: v.stage for v in reg.versions("bot")}
    assert [stages.get(third) for _, _, third in refs] == [None] * 3  # deleted
    assert [stages[second] for _, second, _ in refs] == ["draft"] * 3  # promoted, then demoted
    released = [f"bot@{e.version}" for e in reg.history("bot") if e.details.get("to") == "production"]
    assert sorted(released) == sorted(first for first, _, _ in refs)
    expected = dict.fromkeys(released, "archived") | {released[-1]: "production"}
    assert {ref: stages[ref] for ref in released} == expected
    assert all(d["gc"] == [] for d in done)
    imported = {v.ref: v.digest for v in reg.versions("imp")}
    assert dict(d["imported"] for d in done) == imported
    assert sorted(imported.values()) == sorted(digest for _, digest in bundles[1:])
    each = {"register": 4, "promote": 2, "demote": 1, "delete": 1, "import": 1}
    assert Counter((e.who, e.action) for e in reg.history()) == {
        (f"w{i}", action): n for i in range(3) for action, n in each.items()
    }


# -- 3. two promotions that reach the write together ---------------------------------------------------
def _promote_when_all_have_read(location: str, ref: str, to: str, together: Any) -> str:
    """Promote `ref` in this forked process; the write (`Registry._move`) waits until every promoter has
    read its version, so they all reach it together."""
    move = Registry._move

    def move_together(self: Registry, *args: Any, **kwargs: Any) -> Any:
        together.wait(TIMEOUT)
        return move(self, *args, **kwargs)

    Registry._move = move_together
    return Registry.open(location).promote(ref, to, force=to == "production").ref


def test_one_version_promoted_twice_at_once_moves_once_and_the_other_is_a_conflict(
    location, adapters
) -> None:
    """Two processes read bot@1 as a draft and write its promotion together: one wins, the other gets a
    RegistryError saying the version changed while its promote ran; bot@1 moved once, logged once."""
    reg = Registry.open(location)
    reg.register("bot", adapters[0])
    together = FORK.Barrier(2)
    results = _in_processes([(_promote_when_all_have_read, (location, "bot@1", "staging", together))] * 2)
    conflicts = [r for r in results if isinstance(r, RegistryError) and "changed while" in str(r)]
    assert len(conflicts) == 1 and results.count("bot@1") == 1, results
    assert reg.resolve_version("bot@1").stage == "staging"
    assert [(e.action, e.version, e.details.get("to")) for e in reg.history()] == [
        ("register", 1, None), ("promote", 1, "staging")
    ]  # fmt: skip
    assert_sound(reg)


def test_two_versions_forced_into_production_at_once_leave_exactly_one_there(location, adapters) -> None:
    """Two processes force bot@1 and bot@2 into production together: the writes are serialised, so both
    succeed and the one written last is in production, the other archived (never two in production),
    with both promotions logged in that order."""
    reg = Registry.open(location)
    reg.register("bot", adapters[0])
    reg.register("bot", adapters[1])
    together = FORK.Barrier(2)
    calls = [(_promote_when_all_have_read, (location, f"bot@{n}", "production", together)) for n in (1, 2)]
    assert _in_processes(calls) == ["bot@1", "bot@2"]
    order = [e.version for e in reg.history() if e.action == "promote"]
    assert sorted(order) == [1, 2]
    assert {v.number: v.stage for v in reg.versions()} == {order[0]: "archived", order[1]: "production"}
    assert_sound(reg)


# -- a race found while writing these tests -------------------------------------------------------------
def _gc_removing_after_reuse(location: str, decided: Any, reused: Any) -> list[str]:
    """gc, under the writer lock; each removal waits until the racing register has reused the file."""
    unlink = os.unlink

    def unlink_after_reuse(*args: Any, **kwargs: Any) -> Any:
        decided.set()  # gc found the file unreferenced and older than its grace period
        reused.wait(TIMEOUT)
        return unlink(*args, **kwargs)

    os.unlink = unlink_after_reuse
    return Registry.open(location).gc()


def _register_reusing(location: str, adapter: Path, decided: Any, reused: Any) -> str:
    """Register `adapter`, whose files are stored already: refresh them (BlobStore.put's os.utime) only
    once gc has decided to remove one, and reach the writer lock only once that is done."""
    utime = os.utime

    def utime_after_gc_decided(*args: Any, **kwargs: Any) -> Any:
        decided.wait(TIMEOUT)
        return utime(*args, **kwargs)

    os.utime = utime_after_gc_decided
    reg = Registry.open(location)
    transaction = reg.db.transaction

    def transaction_after_reuse(write: bool = False) -> Any:
        if write:
            reused.set()
        return transaction(write)

    reg.db.transaction = transaction_after_reuse
    return reg.register("bot", adapter).ref


def test_gc_racing_a_register_that_reuses_an_old_file_leaves_no_version_without_it(
    location, adapters
) -> None:
    """gc (default grace) finds the weights of a version deleted hours ago unreferenced and old; a
    register of those same weights refreshes the file (BlobStore.put: exists, os.utime) outside the
    writer lock, and gc removes it anyway. The register must then store it again under the lock (or
    fail), never commit a version whose file is gone."""
    reg = Registry.open(location)
    reg.register("bot", adapters[0])
    weights = reg.register("bot", adapters[1]).files["adapter_model.safetensors"]
    reg.delete("bot@2")
    hours_ago = time.time() - 7200
    os.utime(reg.blobs.path(weights), (hours_ago, hours_ago))  # deleted long ago, as gc's grace reads it
    decided, reused = FORK.Event(), FORK.Event()
    calls = [(_gc_removing_after_reuse, (location, decided, reused)),
             (_register_reusing, (location, adapters[1], decided, reused))]  # fmt: skip
    collected, registered = _in_processes(calls)
    assert collected in ([], [weights]) and (registered == "bot@3" or isinstance(registered, RegistryError))
    assert_sound(reg, "a version registered while gc removed its reused file")


def test_gc_removes_the_scratch_copy_a_killed_import_left(location, bundles) -> None:
    """An import killed after unpacking the bundle leaves its scratch copy (`<registry>/.bundle-*`,
    every file of the bundle) behind; gc removes it, as it removes the partial copies a killed
    register leaves."""
    code, _ = _write(location, lambda reg: import_bundle(reg, bundles[0][0]), kill_at=3)  # at its 1st link
    reg = Registry.open(location)
    assert code == -signal.SIGKILL and list(reg.root.glob(".bundle-*/adapter"))  # killed, unpacked
    reg.gc(grace=0)
    assert_sound(reg)
    assert list(reg.root.glob(".bundle-*")) == []
