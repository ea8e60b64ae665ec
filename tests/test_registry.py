"""The adapter registry's store: versions are immutable and content-addressed, registering the same
files twice is a no-op, references resolve to verified files that load, and a tampered or truncated
file is refused by name. Each test runs on both backends: SQLite, and a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest
import torch
from conftest import tiny_llama

from peftkit import AdaptedModel, AdapterFileError, IA3Config, LoraConfig, RequestError
from peftkit.errors import RegistryError, RegistryIntegrityError
from peftkit.registry import Registry, parse_ref
from peftkit.registry.db import SCHEMA_VERSION


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """Where a test's registry lives: a directory (SQLite), or a fresh PostgreSQL database whose files
    are kept in a directory (the `files` parameter)."""
    if request.param == "sqlite":
        return str(tmp_path / "reg")
    return request.getfixturevalue("postgres_url") + f"&files={tmp_path / 'reg'}"


def raw(reg: Registry, sql: str, params: tuple = ()) -> None:
    """A change made behind the registry's back, through its own database connection."""
    with reg.db.transaction() as tx:
        tx.execute(sql, params)


def base():
    """The same tiny base model every time (the adapters' recorded fingerprint must match)."""
    torch.manual_seed(0)
    return tiny_llama()


def saved_adapter(path, config=None, seed=0):
    model = base()
    torch.manual_seed(seed)
    am = AdaptedModel.attach(model, config or LoraConfig(r=2, init_lora_weights=False))
    am.save_adapter(path)
    return path


def test_register_numbers_versions_and_identical_files_are_a_no_op(tmp_path, location) -> None:
    reg = Registry.open(location)
    a, b = saved_adapter(tmp_path / "a"), saved_adapter(tmp_path / "b", seed=1)
    v1 = reg.register("bot", a, user="ann", description="first", tags=["x", "a"])
    assert (v1.number, v1.stage, v1.method, v1.created_by, v1.tags) == (1, "draft", "lora", "ann", ("a", "x"))
    assert set(v1.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert reg.register("bot", a, user="bob") == v1  # the same files: the existing version
    v2 = reg.register("bot", b, parent="bot@1")
    assert v2.number == 2 and v2.parent == v1.digest and v2.digest != v1.digest
    assert [v.number for v in reg.versions("bot")] == [1, 2]
    assert reg.register("other", a).number == 1  # numbers are per name; the files are stored once
    assert len(reg.blobs.all()) == 3  # a and b differ in their weights only: one config file for both


def test_references_resolve_to_verified_files_that_load(tmp_path, location) -> None:
    reg = Registry.open(location)
    source = saved_adapter(tmp_path / "a", IA3Config(init_ia3_weights=False))
    v = reg.register("scaler", source)
    for ref in ("scaler@1", f"scaler@sha256:{v.digest[:8]}", f"scaler@sha256:{v.digest}"):
        assert reg.resolve_version(ref) == v
    path = reg.resolve("scaler@1")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in source.iterdir())
    x = torch.randint(0, 60, (2, 5))
    expected = AdaptedModel.from_pretrained(base(), source)(input_ids=x).logits
    got = AdaptedModel.from_pretrained(base(), path)(input_ids=x).logits
    assert torch.equal(got, expected)
    assert reg.resolve("scaler@1") == path  # resolved again: the same checkout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("bot@0", "no stage, version or digest"), ("bot@sha256:12", "no stage"), ("a@b@c", "bad adapter"),
     ("../x", "not valid"), ("bot@prod", "no stage")],
)  # fmt: skip
def test_bad_references_name_the_accepted_forms(text: str, fragment: str) -> None:
    with pytest.raises(RequestError, match=fragment):
        parse_ref(text)


def test_unknown_names_versions_and_stages_say_what_exists(tmp_path, location) -> None:
    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    with pytest.raises(RegistryError, match="no adapter named 'nope'"):
        reg.resolve_version("nope@1")
    with pytest.raises(RegistryError, match=r"bot@7: no such version; 'bot' has versions \[1\]"):
        reg.resolve_version("bot@7")
    with pytest.raises(RegistryError, match="no production version"):
        reg.resolve_version("bot")  # nothing promoted yet


def test_a_tampered_or_truncated_file_is_refused_by_version_and_name(tmp_path, location) -> None:
    reg = Registry.open(location)
    v = reg.register("bot", saved_adapter(tmp_path / "a"))
    assert reg.check() == []
    blob = reg.blobs.path(v.files["adapter_model.safetensors"])
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.truncate(blob.stat().st_size - 1)
    with pytest.raises(
        RegistryIntegrityError, match="bot@1: adapter_model.safetensors: .* changed or truncated"
    ):
        reg.resolve("bot@1")
    assert len(reg.check()) == 1 and "bot@1" in reg.check()[0]
    blob.unlink()
    with pytest.raises(RegistryIntegrityError, match="missing"):
        reg.resolve("bot@1")


def test_what_is_not_an_adapter_or_a_registry_is_refused_and_nothing_changes(tmp_path, location) -> None:
    reg = Registry.open(location)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("hi")
    with pytest.raises(AdapterFileError):
        reg.register("bot", tmp_path / "notes")
    assert reg.versions() == [] and reg.blobs.all() == []
    with pytest.raises(RequestError, match="not valid in the registry"):
        reg.register("no/slash", saved_adapter(tmp_path / "a"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="is a file"):
        Registry.open(tmp_path / "file")


def test_a_database_from_a_newer_schema_is_refused_unchanged(tmp_path, location) -> None:
    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    raw(reg, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(RegistryError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Registry.open(location)
    with reg.db.transaction() as tx:
        assert tx.one("SELECT value FROM meta WHERE key = 'schema_version'") == (str(SCHEMA_VERSION + 1),)
        assert tx.one("SELECT COUNT(*) FROM versions") == (1,)


def test_the_default_location_and_user_come_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PEFTKIT_REGISTRY", str(tmp_path / "env-reg"))
    monkeypatch.setenv("PEFTKIT_USER", "ci-bot")
    reg = Registry.open()
    assert reg.root == tmp_path / "env-reg"
    assert reg.register("bot", saved_adapter(tmp_path / "a")).created_by == "ci-bot"
    shutil.rmtree(tmp_path / "a")
    assert reg.resolve("bot@1").is_dir()  # the registry keeps its own copy


def test_stages_promotion_rollback_and_their_audit_trail(tmp_path, location) -> None:
    reg = Registry.open(location)
    for seed in range(3):
        reg.register("bot", saved_adapter(tmp_path / f"a{seed}", seed=seed), user="ann")
    reg.promote("bot@1", "staging", user="bob")
    with pytest.raises(RegistryError, match="evaluation gate"):
        reg.promote("bot@1", "production")  # no gate yet: only a forced, audited promotion
    reg.promote("bot@1", "production", force=True, user="bob", reason="first release")
    assert reg.resolve_version("bot").number == 1  # NAME is the production version
    reg.promote("bot@2", "production", force=True)
    assert [(v.number, v.stage) for v in reg.versions("bot")] == [
        (1, "archived"),
        (2, "production"),
        (3, "draft"),
    ]
    assert reg.rollback("bot", user="carol").number == 1
    assert (
        reg.resolve_version("bot@production").number == 1 and reg.resolve_version("bot@2").stage == "archived"
    )
    with pytest.raises(RegistryError, match="only a draft version goes to staging"):
        reg.promote("bot@1", "staging")
    reg.demote("bot@1", "staging")
    with pytest.raises(RegistryError, match="no production version"):
        reg.resolve_version("bot")
    log = reg.history("bot")
    assert [(e.action, e.version, e.details.get("to")) for e in log] == [
        ("register", 1, None), ("register", 2, None), ("register", 3, None), ("promote", 1, "staging"),
        ("promote", 1, "production"), ("promote", 2, "production"), ("rollback", 1, "production"),
        ("demote", 1, "staging"),
    ]  # fmt: skip
    assert (
        log[4].who == "bob"
        and log[4].details["force"] is True
        and log[4].details["reason"] == "first release"
    )
    assert log[6].who == "carol" and log[6].details["replaced"] == 2
    assert reg.check() == []


def test_an_edited_or_removed_audit_entry_is_found(tmp_path, location) -> None:
    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    reg.promote("bot@1", "staging")
    reg.promote("bot@1", "production", force=True)
    raw(reg, "UPDATE audit SET who = 'mallory' WHERE seq = 2")
    assert any("entry 2 (promote bot) was changed" in p for p in reg.check())
    raw(reg, "UPDATE audit SET who = (SELECT who FROM audit WHERE seq = 1) WHERE seq = 2")
    assert reg.check() == []  # put back as it was: the chain holds again
    raw(reg, "DELETE FROM audit WHERE seq = 3")
    assert any("newest audit entries were removed" in p for p in reg.check())


def test_a_version_moved_meanwhile_is_a_conflict_and_changes_nothing(tmp_path, location) -> None:
    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    seen = reg.resolve_version("bot@1")  # one process reads, another promotes first
    reg.promote("bot@1", "staging")
    with pytest.raises(RegistryError, match="changed while this promote ran"):
        reg._move(seen, "staging", "promote", None, {})
    assert [e.action for e in reg.history()] == ["register", "promote"]


def test_a_version_1_database_is_migrated_and_keeps_its_versions(tmp_path) -> None:
    """On SQLite only: the migration runner is the same code for both backends, and a version-1
    PostgreSQL database is not worth building by hand here."""
    from peftkit.registry.db import MIGRATIONS

    location = tmp_path / "reg"
    (tmp_path / "reg").mkdir()
    with sqlite3.connect(tmp_path / "reg" / "registry.db") as conn:  # what the first release wrote
        conn.executescript(MIGRATIONS[0])
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO versions VALUES (1, 'bot', 1, 'ab', 'draft', 'lora', NULL, NULL, NULL, NULL, NULL, "
            "'ann', '2026-11-29T00:00:00+00:00', '', '[]', '{}')"
        )
    reg = Registry.open(location)  # migrates to the current schema
    assert [(v.ref, v.created_by) for v in reg.versions()] == [("bot@1", "ann")]
    reg.promote("bot@1", "staging")
    assert [e.action for e in reg.history()] == ["register", "promote"]  # the migration logged bot@1
    assert reg.history()[0].details["migrated"] is True


def _register_all(location: str, name: str, dirs: list[str], start) -> list[int]:
    """One writer process: wait for the others, then register its adapters one after another."""
    start.wait()
    reg = Registry.open(location)
    return [reg.register(name, d, user=f"w{os.getpid()}").number for d in dirs]


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path, location) -> None:
    import multiprocessing

    dirs = [str(saved_adapter(tmp_path / f"a{i}", seed=i)) for i in range(8)]
    batches = [dirs[0:3], dirs[3:6], dirs[6:8] + dirs[0:1]]  # dirs[0] twice: registered once
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Barrier(len(batches))
    with ctx.Pool(len(batches)) as pool:
        results = pool.starmap(_register_all, [(location, "bot", b, start) for b in batches])
    reg = Registry.open(location)
    versions = reg.versions("bot")
    assert [v.number for v in versions] == list(range(1, 9))  # 8 distinct adapters, numbers 1..8, no gap
    assert len({v.digest for v in versions}) == 8
    assert results[0][0] == results[2][-1]  # the same files got the same version in both writers
    assert reg.check() == []
    assert [e.action for e in reg.history()].count("register") == 8


def test_delete_refuses_production_and_parents_and_gc_frees_only_unreferenced_files(
    tmp_path, location
) -> None:
    reg = Registry.open(location)
    a, b, c = (saved_adapter(tmp_path / n, seed=i) for i, n in enumerate("abc"))
    reg.register("bot", a)
    reg.register("bot", b, parent="bot@1")
    v3 = reg.register("bot", c)
    reg.promote("bot@3", "production", force=True)
    with pytest.raises(RegistryError, match="is in production"):
        reg.delete("bot@3")
    with pytest.raises(RegistryError, match="parent of bot@2"):
        reg.delete("bot@1")
    checkout = reg.resolve("bot@2")  # a checkout, which gc removes with its version
    weights_2 = reg.resolve_version("bot@2").files["adapter_model.safetensors"]
    assert reg.gc(grace=0) == []  # everything is referenced
    reg.delete("bot@2", reason="bad run")
    assert reg.gc(grace=3600) == []  # too young to collect
    assert reg.gc(grace=0) == [weights_2]  # its weights only: the config file is shared with 1 and 3
    assert not checkout.exists() and v3.files["adapter_model.safetensors"] in reg.blobs.all()
    assert reg.check() == [] and [v.number for v in reg.versions("bot")] == [1, 3]
    assert reg.history("bot")[-1].action == "delete" and reg.history("bot")[-1].details["reason"] == "bad run"


def test_a_bundle_moves_a_version_between_registries(tmp_path, location) -> None:
    from peftkit.registry.bundle import export_bundle, import_bundle

    source = Registry.open(tmp_path / "source")
    v = source.register("bot", saved_adapter(tmp_path / "a"), description="from the lab", tags=["x"])
    source.promote("bot@1", "staging")
    bundle = export_bundle(source, "bot@1", tmp_path / "bot.tar")
    target = Registry.open(location)
    imported = import_bundle(target, bundle, user="ops")
    assert (imported.ref, imported.digest, imported.description, imported.tags) == (
        "bot@1",
        v.digest,
        "from the lab",
        ("x",),
    )
    assert import_bundle(target, bundle) == imported  # the same files again: no new version
    assert [e.action for e in target.history("bot")].count("import") == 1  # and no second record
    register, entry = target.history("bot")
    assert (register.action, register.seq + 1, register.version) == ("register", entry.seq, 1)  # one step
    assert (entry.who, entry.details["source"], entry.details["source_audit_entries"]) == ("ops", "bot@1", 2)
    assert (entry.details["source_created_by"], entry.details["source_created_at"]) == (
        v.created_by,
        v.created_at,
    )
    assert target.check() == []


def test_an_imported_child_keeps_its_parent_when_the_registry_has_it(tmp_path, location) -> None:
    from peftkit.registry.bundle import export_bundle, import_bundle

    source = Registry.open(tmp_path / "source")
    source.register("bot", saved_adapter(tmp_path / "a"))
    child = source.register("bot", saved_adapter(tmp_path / "b", seed=1), parent="bot@1")
    target = Registry.open(location)
    orphan = import_bundle(target, export_bundle(source, "bot@2", tmp_path / "child.tar"))
    assert orphan.parent is None  # the parent is not here: the import entry keeps the source's
    assert target.history("bot")[-1].details["source_parent"] == child.parent
    other = Registry.open(tmp_path / "other")
    import_bundle(other, export_bundle(source, "bot@1", tmp_path / "parent.tar"))
    assert import_bundle(other, tmp_path / "child.tar").parent == child.parent


def test_resolving_for_another_base_is_refused_unless_overridden_and_audited(tmp_path, location) -> None:
    reg = Registry.open(location)
    v = reg.register("bot", saved_adapter(tmp_path / "a"))
    assert reg.resolve("bot@1", base_fingerprint=v.base_fingerprint).is_dir()  # its own base: fine
    other = "sha256:" + "0" * 64
    with pytest.raises(RegistryError) as e:
        reg.resolve("bot@1", base_fingerprint=other)
    assert v.base_fingerprint in str(e.value) and other in str(e.value)
    assert [x.action for x in reg.history()] == ["register"]
    reg.resolve("bot@1", base_fingerprint=other, allow_other_base=True, user="ann")
    entry = reg.history()[-1]
    assert (entry.action, entry.who, entry.version) == ("override", "ann", 1)
    assert (entry.details["base_fingerprint"], entry.details["recorded"]) == (other, v.base_fingerprint)
    assert reg.check() == []


def test_opening_a_current_registry_takes_no_writer_lock(tmp_path, location) -> None:
    """Reads do not queue behind a writer: a registry opens and lists while another process holds
    the writer lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: the advisory lock)."""
    import threading

    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    seen: list = []
    with reg.db.transaction(write=True):
        reader = threading.Thread(target=lambda: seen.append(Registry.open(location).versions()))
        reader.start()
        reader.join(timeout=900)
        assert not reader.is_alive() and [v.ref for v in seen[0]] == ["bot@1"]


def test_gc_removes_copies_a_crashed_writer_left_behind(tmp_path, location) -> None:
    reg = Registry.open(location)
    sha = reg.register("bot", saved_adapter(tmp_path / "a")).files["adapter_config.json"]
    partial = reg.blobs.path(sha).parent / f".{sha[:12]}.abc.tmp"  # what BlobStore.put writes first
    partial.write_bytes(b"half a fi")
    assert reg.blobs.all() == sorted(reg.resolve_version("bot@1").files.values())  # not counted as stored
    assert reg.gc(grace=3600) == [] and partial.exists()  # young: maybe a writer still copying
    assert reg.gc(grace=0) == [] and not partial.exists()
    assert reg.check() == []


def tarfile_member(data: bytes, name: str) -> bytes:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile(name).read()


def _tar(path, members: list[tuple[str, bytes | None, str]]) -> None:
    """A hand-made tar: (name, bytes, kind) with kind 'file', 'symlink' or 'dir'."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)


def test_a_malicious_truncated_or_tampered_bundle_is_refused_and_nothing_is_imported(
    tmp_path, monkeypatch
) -> None:
    import hashlib
    import json

    from peftkit.registry import bundle as bundle_mod
    from peftkit.registry.bundle import export_bundle, import_bundle

    source = Registry.open(tmp_path / "source")
    source.register("bot", saved_adapter(tmp_path / "a"))
    good = export_bundle(source, "bot@1", tmp_path / "good.tar").read_bytes()
    target = Registry.open(tmp_path / "target")
    from peftkit.registry.versions import manifest_digest

    listed = {"adapter_config.json": hashlib.sha256(b"{}").hexdigest()}
    manifest = json.dumps({"format": "peftkit-bundle", "format_version": 1, "files": listed,
                           "version": {"name": "bot", "number": 1, "digest": manifest_digest(listed)}}).encode()  # fmt: skip
    edited = json.loads(tarfile_member(good, "manifest.json"))
    edited["version"]["digest"] = "0" * 64
    cases = {
        "traversal": ([("manifest.json", manifest, "file"), ("../../evil", b"x", "file")], "unexpected member"),
        "symlink": ([("manifest.json", manifest, "file"), ("files/" + "a" * 64, None, "symlink")], "not a regular"),
        "directory": ([("files", None, "dir")], "not a regular"),
        "twice": ([("manifest.json", manifest, "file"), ("manifest.json", manifest, "file")], "appears twice"),
        "missing file": ([("manifest.json", manifest, "file")], "is missing"),
        "tampered": ([("manifest.json", manifest, "file"), ("files/" + hashlib.sha256(b"{}").hexdigest(), b"{ }", "file")], "does not match"),
        "no manifest": ([("audit.jsonl", b"", "file")], "no manifest"),
        "dot name": ([("manifest.json", manifest.replace(b"adapter_config.json", b".."), "file")], "malformed"),
        "edited digest": ([("manifest.json", json.dumps(edited).encode(), "file")], "digest does not match"),
        "unlisted": ([("manifest.json", manifest, "file"), ("files/" + hashlib.sha256(b"{}").hexdigest(), b"{}", "file"),
                      ("files/" + "b" * 64, b"x", "file")], "does not list"),
    }  # fmt: skip
    for case, (members, fragment) in cases.items():
        _tar(tmp_path / f"{case}.tar", members)
        with pytest.raises(RegistryError, match=fragment):
            import_bundle(target, tmp_path / f"{case}.tar")
    (tmp_path / "truncated.tar").write_bytes(good[: len(good) // 2])
    with pytest.raises(RegistryError, match="truncated|missing|not a readable"):
        import_bundle(target, tmp_path / "truncated.tar")
    monkeypatch.setattr(bundle_mod, "MAX_BYTES", 100)
    with pytest.raises(RegistryError, match="over the 100 limit"):
        import_bundle(target, tmp_path / "good.tar")
    assert target.versions() == [] and target.blobs.all() == [] and target.history() == []


def test_an_unwritable_registry_location_is_a_clear_error(read_only_dir) -> None:
    with pytest.raises(RegistryError, match="cannot create the registry directory"):
        Registry.open(read_only_dir / "reg")
    with pytest.raises(RegistryError, match=r"not writable|cannot open the registry database|failed"):
        Registry.open(read_only_dir)


def test_a_read_only_registry_can_be_read_and_refuses_changes_clearly(tmp_path) -> None:
    """A registry on a read-only mount (SQLite): list, show, history and check work; a change or a
    resolve that would write is one clear RegistryError, and nothing changes."""
    from conftest import read_only

    reg = Registry.open(tmp_path / "reg")
    reg.register("bot", saved_adapter(tmp_path / "a"))
    with read_only(tmp_path / "reg"):
        ro = Registry.open(tmp_path / "reg", create=False)
        assert [v.ref for v in ro.versions()] == ["bot@1"] and ro.check() == []
        assert [e.action for e in ro.history("bot")] == ["register"]
        with pytest.raises(RegistryError, match="failed"):
            ro.promote("bot@1", "staging")
        with pytest.raises(RegistryError, match="needs a writable registry"):
            ro.resolve("bot@1")
        with pytest.raises(RegistryError, match="not writable"):
            Registry.open(tmp_path / "reg")  # opened to write: refused up front
    assert [v.stage for v in reg.versions()] == ["draft"] and reg.check() == []


def test_numbers_are_never_reused_and_rollback_finds_the_right_version(tmp_path, location) -> None:
    reg = Registry.open(location)
    for i in range(2):
        reg.register("bot", saved_adapter(tmp_path / f"a{i}", seed=i))
    reg.promote("bot@1", "production", force=True)
    reg.promote("bot@2", "production", force=True)
    reg.rollback("bot")
    reg.delete("bot@2")
    assert reg.register("bot", saved_adapter(tmp_path / "a2", seed=2)).number == 3  # not a second bot@2
    with pytest.raises(RegistryError, match="no such version"):
        reg.rollback("bot")  # its previous production version was deleted: no stand-in takes its place
    assert reg.resolve_version("bot").number == 1


def test_what_was_changed_behind_the_registrys_back_is_found(tmp_path, location) -> None:
    reg = Registry.open(location)
    a = reg.register("bot", saved_adapter(tmp_path / "a", seed=0))
    b = reg.register("bot", saved_adapter(tmp_path / "b", seed=1))
    checkout = reg.resolve("bot@1")
    weights = checkout / "adapter_model.safetensors"
    weights.unlink()  # another adapter's weights put in the checkout
    shutil.copy(reg.blobs.path(b.files["adapter_model.safetensors"]), weights)
    assert reg.resolve("bot@1") == checkout  # rebuilt from the verified files
    assert os.path.samefile(weights, reg.blobs.path(a.files["adapter_model.safetensors"]))
    raw(reg, "UPDATE version_files SET sha256 = ? WHERE path = 'adapter_model.safetensors' AND sha256 = ?",
        (b.files["adapter_model.safetensors"], a.files["adapter_model.safetensors"]))  # fmt: skip
    with pytest.raises(RegistryIntegrityError, match="no longer gives its digest"):
        reg.resolve("bot@1")
    assert any("no longer gives its digest" in p for p in reg.check())


def test_a_wiped_audit_log_is_found(tmp_path, location) -> None:
    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    raw(reg, "DELETE FROM audit")
    raw(reg, "DELETE FROM meta WHERE key = 'audit_head'")
    assert any("no matching 'register' entry" in p for p in reg.check())


def test_a_gate_result_for_a_production_version_that_changed_meanwhile_is_a_conflict(
    tmp_path, location
) -> None:
    reg = Registry.open(location)
    for i in range(3):
        reg.register("bot", saved_adapter(tmp_path / f"a{i}", seed=i))
    reg.promote("bot@1", "production", force=True)
    candidate = reg.resolve_version("bot@3")
    gate_result = {"passed": True, "production": 1}  # what a gate for bot@3 saw while it ran...
    reg.promote("bot@2", "production", force=True)  # ...while another promotion landed
    with pytest.raises(RegistryError, match="changed while bot@3's gate ran"):
        reg._move(candidate, "production", "promote", None, {"gate": gate_result})
    assert reg.resolve_version("bot").number == 2


def test_changes_made_outside_the_registry_are_recorded_in_its_chain(tmp_path, location) -> None:
    reg = Registry.open(location)
    reg.register("bot", saved_adapter(tmp_path / "a"))
    entry = reg.record("route", "bot", 1, {"canary_percent": 10}, user="ops")
    assert (entry.action, entry.who, entry.version, entry.details) == (
        "route",
        "ops",
        1,
        {"canary_percent": 10},
    )
    assert [e.action for e in reg.history("bot")] == ["register", "route"] and reg.check() == []
    with pytest.raises(RequestError, match="'promote' is the registry's own"):
        reg.record("promote", "bot", 1, {})
    assert len(reg.history()) == 2
