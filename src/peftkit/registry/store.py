"""The adapter registry: immutable, content-addressed versions of named adapters.

    reg = Registry.open("~/.peftkit/registry")           # or PEFTKIT_REGISTRY, or --registry
    v = reg.register("support-bot", "runs/x/adapter-best", description="first try")
    path = reg.resolve("support-bot@1")                 # a directory of verified files, for load_adapter

Layout of a registry directory:

    registry.db                 the SQLite database (schema in db.py)
    files/sha256/<2>/<64>       every file once, by content hash (blobs.py)
    checkouts/<digest>/         each resolved version's files under their own names (hard links)

Registering writes the files first (atomically, by hash), then the version in one transaction: a crash
at any point leaves no version pointing at a missing file. Registering identical files again returns
the existing version.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import peftkit.registry.audit as audit

from ..errors import (
    OtherBaseVersionError,
    RegistryError,
    RegistryIntegrityError,
    RequestError,
    UnknownAdapterError,
)
from ..io import building_dir
from .blobs import BlobStore, file_sha256
from .db import open_database
from .gate import STORED, Gate, check_result
from .refs import STAGES, Ref, check_name, parse_ref
from .versions import Version, adapter_facts, adapter_files, default_user, find, insert, manifest_digest, now

DEFAULT_ROOT = "~/.peftkit/registry"
__all__ = ["DEFAULT_ROOT", "Registry", "Version"]


class Registry:
    """A registry directory: the database and the file store."""

    def __init__(self, root: Path, database: str | None = None) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.db = open_database(database or root / "registry.db")

    @classmethod
    def open(cls, location: str | Path | None = None, *, create: bool = True) -> Registry:
        """The registry at `location`, else $PEFTKIT_REGISTRY, else ~/.peftkit/registry (created): a
        directory (SQLite database and files inside), or a `postgresql://` URL whose files live in the
        shared directory its `files` parameter names (`postgresql://host/db?files=/shared/peftkit`),
        else in $PEFTKIT_REGISTRY_FILES."""
        text = str(location or os.environ.get("PEFTKIT_REGISTRY") or DEFAULT_ROOT)
        if text.startswith(("postgresql://", "postgres://")):
            url, files = _split_files(text)
            return cls(_usable_dir(Path(os.path.expanduser(files)), create), url)
        root = Path(os.path.expanduser(text))
        if not create and not (root / "registry.db").is_file():
            raise RegistryError(f"there is no registry at {text} (register an adapter to create one)")
        return cls(_usable_dir(root, create))

    # -- writing --------------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        adapter_dir: str | Path,
        *,
        user: str | None = None,
        description: str = "",
        tags: tuple[str, ...] | list[str] = (),
        parent: str | None = None,
        imported: dict[str, Any] | None = None,
    ) -> Version:
        """Register the adapter in `adapter_dir` as the next version of `name` (a draft), or return
        the existing version when these exact files are registered under `name` already. `imported`
        (bundle import) is the import's audit record, written in the same transaction."""
        check_name(name)
        adapter_dir = Path(adapter_dir)
        facts = adapter_facts(adapter_dir)
        files = {p.name: file_sha256(p) for p in adapter_files(adapter_dir)}
        parent_digest = self.resolve_version(parent).digest if parent else None
        for path, sha in files.items():  # files first: a version never points at a missing file
            self.blobs.put(adapter_dir / path, sha)
        sized = {path: (sha, self.blobs.path(sha).stat().st_size) for path, sha in files.items()}
        who, when = user or default_user(), now()
        with self.db.transaction(write=True) as tx:
            existing = find(tx, "name = ? AND digest = ?", (name, manifest_digest(files)))
            if existing:
                return existing[0]
            for path, sha in files.items():  # gc (under this lock) may have removed a reused old file
                if not self.blobs.has(sha):
                    self.blobs.put(adapter_dir / path, sha)
            version = insert(
                tx, name, facts, sized, parent=parent_digest, created_by=who, created_at=when,
                description=description, tags=tags,
            )  # fmt: skip
            audit.append(tx, when, who, "register", name, version.number, {"digest": version.digest})
            if imported is not None:
                audit.append(tx, when, who, "import", name, version.number, imported)
            return version

    def promote(
        self,
        ref: str,
        to: str,
        *,
        user: str | None = None,
        force: bool = False,
        reason: str = "",
        gate_result: dict[str, Any] | None = None,
    ) -> Version:
        """Move a version up a stage: draft -> staging -> production. The production version it
        replaces is archived (rollback brings it back). Promotion to production needs a pass of the
        name's evaluation gate (`set_gate`): `gate_result` is the result `peftkit.policy.pass_gate`
        returns, which is checked against the gate and stored with the promotion; `force=True` skips
        the gate, and the audit log records that. `peftkit.policy.promote` runs the gate and calls this."""
        version = self.check_promotion(ref, to)
        details: dict[str, Any] = {"from": version.stage, "force": force, "reason": reason}
        if to == "production" and not force:
            gate = self.require_gate(version.name)
            if gate_result is None:
                return _promote_running_the_gate(self, ref, to, user=user, reason=reason)
            check_result(gate, version.ref, gate_result)
            details["gate"] = gate_result
        return self._move(version, to, "promote", user, details)

    def check_promotion(self, ref: str, to: str) -> Version:
        """The version `ref` names, if it may be promoted `to` that stage (a RegistryError if not)."""
        if to not in ("staging", "production"):
            raise RequestError(
                f"promote to 'staging' or 'production', not {to!r} (demote archives or drafts)"
            )
        version = self.resolve_version(ref)
        allowed = {"staging": ("draft",), "production": ("draft", "staging")}[to]
        if version.stage not in allowed:
            raise RegistryError(
                f"{version.ref} is in {version.stage}; only a {' or '.join(allowed)} version goes to {to}"
            )
        return version

    def require_gate(self, name: str) -> Gate:
        """`name`'s evaluation gate, or the RegistryError that says how to set one (or to --force)."""
        gate = self.gate(name)
        if gate is None:
            raise RegistryError(
                f"{name!r} has no evaluation gate, which promotion to production runs: set one with "
                f"`peftkit registry gate {name} task:NAME --min-score X`, or promote with --force "
                "(recorded in the audit log)"
            )
        return gate

    def set_gate(self, name: str, gate: Gate, *, user: str | None = None) -> Gate:
        """Set the evaluation gate of `name`'s promotions to production. An eval file (not a built-in
        task) is stored in the registry by hash, so the gate keeps evaluating on the same data."""
        check_name(name)
        if not gate.data.startswith("task:"):
            source = Path(gate.data)
            if not source.is_file():
                raise RequestError(
                    f"gate data {gate.data!r} is neither a built-in task (task:NAME) nor a file"
                )
            sha = self.blobs.put(source)
            gate = replace(gate, data=f"{STORED}{sha}/{source.name}")
        with self.db.transaction(write=True) as tx:
            if gate.data.startswith(STORED) and not self.blobs.has(sha):
                self.blobs.put(source, sha)  # gc (under this lock) removed it meanwhile
            tx.execute(
                "INSERT INTO gates (name, config) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET config = excluded.config",
                (name, json.dumps(gate.to_dict(), sort_keys=True)),
            )
            audit.append(tx, now(), user or default_user(), "gate", name, None, gate.to_dict())
        return gate

    def gate(self, name: str) -> Gate | None:
        """The evaluation gate set for `name`, if any."""
        with self.db.transaction() as tx:
            row = tx.one("SELECT config FROM gates WHERE name = ?", (check_name(name),))
        return Gate(**json.loads(row[0])) if row else None

    def demote(self, ref: str, to: str = "archived", *, user: str | None = None, reason: str = "") -> Version:
        """Move a version down: to staging, draft, or out of use (archived)."""
        if to not in ("draft", "staging", "archived"):
            raise RequestError(f"demote to 'draft', 'staging' or 'archived', not {to!r}")
        version = self.resolve_version(ref)
        if to == version.stage:
            raise RegistryError(f"{version.ref} is in {to} already")
        if STAGES.index(to) >= STAGES.index(version.stage) and to != "archived":
            raise RegistryError(f"{version.ref} is in {version.stage}: demoting it to {to} is no step down")
        return self._move(version, to, "demote", user, {"from": version.stage, "reason": reason})

    def rollback(self, name: str, *, user: str | None = None, reason: str = "") -> Version:
        """Put the previous production version of `name` back in production (the current one is
        archived), without re-running anything; returns the version now in production."""
        with self.db.transaction() as tx:
            promoted = [
                e.version for e in audit.entries(tx, check_name(name)) if e.details.get("to") == "production"
            ]
        current = self.resolve_version(f"{name}@production")
        earlier = [n for n in promoted if n != current.number]
        if not earlier:
            raise RegistryError(
                f"{current.ref} is the only version of {name!r} ever in production: nothing to roll back to"
            )
        previous = self.resolve_version(f"{name}@{earlier[-1]}")
        return self._move(
            previous,
            "production",
            "rollback",
            user,
            {"from": previous.stage, "replaced": current.number, "reason": reason},
        )

    def _move(
        self, version: Version, to: str, action: str, user: str | None, details: dict[str, Any]
    ) -> Version:
        """Set a version's stage in one transaction, archiving the version it displaces from production,
        and record it. The version must still be where it was read: a concurrent change is a conflict."""
        who = user or default_user()
        with self.db.transaction(write=True) as tx:
            row = tx.one(
                "SELECT stage FROM versions WHERE name = ? AND number = ?", (version.name, version.number)
            )
            if row is None or row[0] != version.stage:
                raise RegistryError(
                    f"{version.ref} changed while this {action} ran (it is {row[0] if row else 'gone'} now, was "
                    f"{version.stage}); look again with `peftkit registry show {version.ref}` and retry"
                )
            if to == "production":
                current = [n for (n,) in tx.execute(
                    "SELECT number FROM versions WHERE name = ? AND stage = 'production'", (version.name,)
                )]  # fmt: skip
                gate = details.get("gate")
                if gate and gate.get("production") != (current[0] if current else None):
                    raise RegistryError(
                        f"the production version of {version.name!r} changed while {version.ref}'s gate ran "
                        f"(it compared with {gate.get('production')}, it is {current[0] if current else None} "
                        "now): promote again, so the gate compares with the new one"
                    )
                for number in current:
                    tx.execute(
                        "UPDATE versions SET stage = 'archived' WHERE name = ? AND number = ?",
                        (version.name, number),
                    )
            tx.execute(
                "UPDATE versions SET stage = ? WHERE name = ? AND number = ?",
                (to, version.name, version.number),
            )
            details = {**details, "to": to, "digest": version.digest}
            audit.append(tx, now(), who, action, version.name, version.number, details)
            return find(tx, "name = ? AND number = ?", (version.name, version.number))[0]

    def delete(self, ref: str, *, user: str | None = None, reason: str = "") -> Version:
        """Remove a version from the registry (its files stay until `gc`). A version in production, or
        the parent of another version, is refused: demote it, or delete its children, first."""
        version = self.resolve_version(ref)
        with self.db.transaction(write=True) as tx:
            row = tx.one(
                "SELECT id, stage FROM versions WHERE name = ? AND number = ?", (version.name, version.number)
            )
            if row is None:
                raise RegistryError(f"{version.ref} was deleted meanwhile")
            if row[1] == "production":
                raise RegistryError(
                    f"{version.ref} is in production; demote it (or roll back) before deleting it"
                )
            children = [
                f"{n}@{k}"
                for n, k in tx.execute(
                    "SELECT name, number FROM versions WHERE parent = ?", (version.digest,)
                )
            ]
            if children:
                raise RegistryError(
                    f"{version.ref} is the parent of {', '.join(children)}; delete those first"
                )
            tx.execute("DELETE FROM version_files WHERE version_id = ?", (row[0],))
            tx.execute("DELETE FROM versions WHERE id = ?", (row[0],))
            audit.append(tx, now(), user or default_user(), "delete", version.name, version.number,
                         {"digest": version.digest, "stage": version.stage, "reason": reason})  # fmt: skip
        return version

    def gc(self, *, grace: float = 3600.0) -> list[str]:
        """Remove stored files no version (nor gate) refers to, and checkouts of deleted versions;
        return the hashes removed. Files younger than `grace` seconds are kept: a registration in
        progress stores its files before its transaction refers to them."""
        with self.db.transaction(write=True) as tx:
            used = {r[0] for r in tx.execute("SELECT sha256 FROM version_files")}
            used |= {
                json.loads(r[0])["data"].removeprefix(STORED).partition("/")[0]
                for r in tx.execute("SELECT config FROM gates")
            }
            digests = {r[0] for r in tx.execute("SELECT digest FROM versions")}
            removed = []
            for sha in self.blobs.all():
                path = self.blobs.path(sha)
                if sha not in used and _older_than(path, grace):
                    path.unlink(missing_ok=True)
                    removed.append(sha)
            for tmp in self.blobs.partial():  # a copy a crashed writer left behind
                if _older_than(tmp, grace):
                    tmp.unlink(missing_ok=True)
            for scratch in self.root.glob(".bundle-*"):  # what a killed import had unpacked
                if _older_than(scratch, grace):
                    shutil.rmtree(scratch, ignore_errors=True)
            checkouts = self.root / "checkouts"
            stale = [p for p in checkouts.glob("*") if p.name != "files" and p.name not in digests]
            stale += [p for p in checkouts.glob("files/*") if p.name not in used]
            for old in stale:
                shutil.rmtree(old, ignore_errors=True)
        return removed

    def history(self, name: str | None = None) -> list[audit.Entry]:
        """The audit log (of `name`, if given), oldest first."""
        with self.db.transaction() as tx:
            return audit.entries(tx, check_name(name) if name else None)

    # -- reading --------------------------------------------------------------------------------------
    def versions(self, name: str | None = None) -> list[Version]:
        """Every version (of `name`, if given), by name and number."""
        with self.db.transaction() as tx:
            if name is None:
                return find(tx, "1 = 1", ())
            return find(tx, "name = ?", (check_name(name),))

    def resolve_version(self, ref: str | Ref) -> Version:
        """The version a reference names; an unknown one is a RegistryError naming what exists."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.db.transaction() as tx:
            if ref.number is not None:
                found = find(tx, "name = ? AND number = ?", (ref.name, ref.number))
            elif ref.digest is not None:
                found = find(tx, "name = ? AND digest LIKE ?", (ref.name, ref.digest + "%"))
            else:
                found = find(tx, "name = ? AND stage = ?", (ref.name, ref.stage))[-1:]
            known = [v.number for v in find(tx, "name = ?", (ref.name,))]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RegistryError(f"{ref} matches {len(found)} versions; give more digits of the digest")
        if not known:
            raise UnknownAdapterError(f"no adapter named {ref.name!r} in the registry {self.root}")
        what = f"no {ref.stage} version" if ref.stage else "no such version"
        raise RegistryError(
            f"{ref}: {what}; {ref.name!r} has versions {known} (refer to one as {ref.name}@N)"
        )

    def resolve(
        self,
        ref: str | Ref,
        *,
        base_fingerprint: str | None = None,
        allow_other_base: bool = False,
        user: str | None = None,
    ) -> Path:
        """A directory holding the version's files under their own names, each verified against its
        hash: what load_adapter, eval, merge and info take. Given the `base_fingerprint` of the model
        it is for (`AdaptedModel.base_fingerprint()`), a version recorded for another base is refused
        with both fingerprints named, unless `allow_other_base`, which the audit log records."""
        version = self.resolve_version(ref)
        if base_fingerprint and version.base_fingerprint and version.base_fingerprint != base_fingerprint:
            if not allow_other_base:
                raise OtherBaseVersionError(
                    f"{version.ref} was trained on a base model with fingerprint {version.base_fingerprint}, "
                    f"not this one ({base_fingerprint}); use a version for this base, or override with "
                    "allow_other_base=True (recorded in the audit log)"
                )
            self.record_override(version, "", base_fingerprint, user=user)
        out = self.root / "checkouts" / version.digest
        self._verify(version)
        if (
            out.is_dir()
            and sorted(p.name for p in out.iterdir()) == sorted(version.files)
            and all(os.path.samefile(out / path, self.blobs.path(sha)) for path, sha in version.files.items())
        ):
            return out  # the same inodes as the verified files: nothing in between was swapped
        try:
            with building_dir(out, if_exists="replace") as tmp:
                for path, sha in version.files.items():
                    os.link(self.blobs.path(sha), tmp / path)  # the same bytes, no copy
        except OSError as e:
            raise RegistryError(
                f"cannot write {version.ref}'s files to {out.parent}: {e.strerror}; resolving needs a "
                "writable registry directory (a read-only one can be listed, shown and checked)"
            ) from None
        return out

    def version_of_checkout(self, directory: Path) -> Version | None:
        """The version whose resolved files `directory` is, or None for any other directory."""
        directory = Path(directory).resolve()
        if directory.parent != (self.root / "checkouts").resolve():
            return None
        with self.db.transaction() as tx:
            found = find(tx, "digest = ?", (directory.name,))
        return found[0] if found else None

    def record(
        self, action: str, name: str, version: int | None, details: dict[str, Any], *, user: str | None = None
    ) -> audit.Entry:
        """Append an entry to the audit log for a change made outside the registry that concerns
        `name` (e.g. the server's canary split: action "route"); the registry's own actions write
        theirs themselves."""
        check_name(name)
        if action in (
            "register",
            "promote",
            "demote",
            "rollback",
            "delete",
            "import",
            "gate",
            "watch",
            "alert",
        ):
            raise RequestError(
                f"the audit action {action!r} is the registry's own; it is written by that change"
            )
        with self.db.transaction(write=True) as tx:
            return audit.append(tx, now(), user or default_user(), action, name, version, details)

    def record_override(
        self, version: Version, base: str, fingerprint: str, *, user: str | None = None
    ) -> None:
        """Audit a version loaded onto a base model other than the one it records (--no-check-base)."""
        with self.db.transaction(write=True) as tx:
            details = {"base": base, "base_fingerprint": fingerprint, "recorded": version.base_fingerprint}
            audit.append(tx, now(), user or default_user(), "override", version.name, version.number, details)

    def _verify(self, version: Version) -> None:
        """The version's file list still gives its digest, and each file its hash."""
        if manifest_digest(version.files) != version.digest:
            raise RegistryIntegrityError(
                f"{version.ref}: its recorded file list no longer gives its digest {version.digest[:12]}...: the "
                "database was changed behind the registry's back; restore it from a backup or a bundle"
            )
        for path, sha in version.files.items():
            self.blobs.verify(sha, f"{version.ref}: {path}")

    def check(self) -> list[str]:
        """Every problem in the store: a version's file missing or not matching its hash, an audit entry
        changed or removed. [] = sound."""
        with self.db.transaction() as tx:
            problems = audit.broken_links(tx)
            registered = {
                (e.name, e.version): e.details.get("digest")
                for e in audit.entries(tx)
                if e.action == "register"
            }
        for version in self.versions():
            try:
                self._verify(version)
            except RegistryIntegrityError as e:
                problems.append(str(e))
            if registered.get((version.name, version.number)) != version.digest:
                problems.append(f"{version.ref} has no matching 'register' entry in the audit log")
        return problems


def _usable_dir(root: Path, create: bool) -> Path:
    """`root`, created if missing (`create`); a file or an unwritable directory is a RegistryError. An
    existing registry opened only to read (`create=False`) may be read-only: listing, showing and
    checking work, changes are refused by the database."""
    if root.exists() and not root.is_dir():
        raise RegistryError(f"registry path {root} is a file; give a directory (it is created if missing)")
    if not create:
        if not root.is_dir():
            raise RegistryError(f"the registry's file store {root} does not exist")
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryError(f"cannot create the registry directory {root}: {e.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RegistryError(f"registry directory {root} is not writable; choose another with --registry")
    return root


def _split_files(url: str) -> tuple[str, str]:
    """A PostgreSQL URL without its `files` parameter, and the file store directory it names."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    files = [v for k, v in query if k == "files"] or [os.environ.get("PEFTKIT_REGISTRY_FILES", "")]
    if not files[-1]:
        raise RegistryError(
            "a PostgreSQL registry keeps its files in a directory every user of it can reach: add "
            "?files=/shared/dir to the URL, or set PEFTKIT_REGISTRY_FILES"
        )
    rest = urlencode([(k, v) for k, v in query if k != "files"])
    return urlunsplit(parts._replace(query=rest)), files[-1]


def _older_than(path: Path, seconds: float) -> bool:
    """Whether `path` was last modified `seconds` ago or more; False once it is gone (a writer working
    beside gc renames its partial copy into place and removes its unpacked bundle when done)."""
    try:
        return time.time() - path.stat().st_mtime >= seconds
    except FileNotFoundError:
        return False


def _promote_running_the_gate(reg: Registry, ref: str, to: str, **kwargs: Any) -> Version:
    """Deprecated: `Registry.promote` to production without a gate result ran the gate itself. The gate
    is policy above the registry now; this one call reaches it by name (not an import, so the registry
    never loads evaluation code) until the next release removes it."""
    import importlib
    import warnings

    warnings.warn(
        "Registry.promote(ref, 'production') without gate_result runs the gate for the last time in this "
        "release: call peftkit.policy.promote(registry, ref, 'production'), which runs the gate above the "
        "registry and passes its result",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module("peftkit.policy").promote(reg, ref, to, **kwargs)
