"""Bundles: one registered version as a self-contained `.tar`, for moving adapters between registries
that share no network (air-gapped training and serving).

    manifest.json    {"format": "peftkit-bundle", "format_version": 1, "version": {...}, "files": {path: sha}}
    audit.jsonl      the adapter's audit entries in the source registry, one JSON object per line
    files/<sha256>   each file's bytes, named by their hash

Import reads and checks everything before it writes anything: only those member names, regular files
only (no links, devices or directories), no member twice, none larger than `MAX_BYTES` (the JSON
members: `MAX_JSON_BYTES`), a manifest whose digest matches its file list, no unlisted file, every
file's hash as recorded, audit entries that match their own hashes. The version and its `import`
audit entry are then written in one transaction; the source's author, time and parent are kept in
that entry (and the parent as the version's parent when this registry holds it too).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import peftkit.registry.audit as audit

from ..errors import RegistryError
from ..io import atomic_file
from .blobs import CHUNK, file_sha256
from .versions import manifest_digest

if TYPE_CHECKING:
    from .store import Registry, Version

FORMAT, FORMAT_VERSION = "peftkit-bundle", 1
MAX_BYTES = 16 << 30  # no adapter file is anywhere near 16 GiB; a bigger member is an attack or an error
MAX_JSON_BYTES = 64 << 20  # the manifest and the audit entries are read whole: 64 MiB is ample
_FILE_MEMBER = re.compile(r"files/([0-9a-f]{64})")


def export_bundle(reg: Registry, ref: str, out: Path) -> Path:
    """Write `ref`'s version (files verified), its metadata and its adapter's audit entries to `out`."""
    version = reg.resolve_version(ref)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": version.to_dict(),
                "files": version.files}  # fmt: skip
    entries = "".join(json.dumps(e.to_dict()) + "\n" for e in reg.history(version.name))
    with atomic_file(Path(out)) as tmp, tarfile.open(tmp, "w") as tar:
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
        _add_bytes(tar, "audit.jsonl", entries.encode())
        for path, sha in sorted(version.files.items()):
            tar.add(reg.blobs.verify(sha, f"{version.ref}: {path}"), arcname=f"files/{sha}")
    return Path(out)


def import_bundle(reg: Registry, bundle: Path, *, user: str | None = None) -> Version:
    """Register the bundle's version in `reg` (as the next version of its name, a draft; the same
    files already registered under that name are a no-op), after checking the whole bundle."""
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=reg.root) as scratch:
        manifest, files, entries = _read_checked(Path(bundle), Path(scratch))
        adapter = Path(scratch) / "adapter"
        adapter.mkdir()
        for path, sha in manifest["files"].items():
            os.link(files[sha], adapter / path)
        source = manifest["version"]
        parent = source.get("parent")
        known = {v.digest for v in reg.versions(source["name"])} if parent else set()
        details = {
            "bundle": str(bundle),
            "source": f"{source['name']}@{source['number']}",
            "source_created_by": source.get("created_by"),
            "source_created_at": source.get("created_at"),
            "source_parent": parent,
            "source_audit_entries": len(entries),
            "source_audit_head": entries[-1]["hash"] if entries else None,
        }
        return reg.register(
            source["name"], adapter, user=user, description=source.get("description", ""),
            tags=source.get("tags", []), parent=f"{source['name']}@sha256:{parent}" if parent in known else None,
            imported=details,
        )  # fmt: skip


def _read_checked(
    bundle: Path, scratch: Path
) -> tuple[dict[str, Any], dict[str, Path], list[dict[str, Any]]]:
    """The manifest, each file (extracted into `scratch` by hash) and the source's audit entries, or a
    RegistryError naming the first problem. Nothing outside `scratch` is written."""

    def bad(problem: str) -> RegistryError:
        return RegistryError(f"bundle {bundle} is refused: {problem}; nothing was imported")

    try:
        tar = tarfile.open(bundle, "r:")  # noqa: SIM115 (closed by the `with tar:` below)
    except (OSError, tarfile.TarError) as e:
        raise bad(f"it is not a readable tar file ({e})") from None
    manifest: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    seen: set[str] = set()
    with tar:
        try:
            for member in tar:
                if member.name in seen:
                    raise bad(f"member {member.name!r} appears twice")
                seen.add(member.name)
                if not member.isfile():
                    raise bad(
                        f"member {member.name!r} is not a regular file (links and directories are refused)"
                    )
                limit = MAX_JSON_BYTES if member.name in ("manifest.json", "audit.jsonl") else MAX_BYTES
                if member.size > limit:
                    raise bad(f"member {member.name!r} is {member.size} bytes, over the {limit} limit")
                match = _FILE_MEMBER.fullmatch(member.name)
                if member.name in ("manifest.json", "audit.jsonl"):
                    data = tar.extractfile(member).read()
                    if member.name == "manifest.json":
                        manifest = _manifest(data, bad)
                    else:
                        entries = _entries(data, bad)
                elif match:
                    target = scratch / match.group(1)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    files[match.group(1)] = target
                else:
                    raise bad(
                        f"unexpected member {member.name!r} (only manifest.json, audit.jsonl and files/<sha256>)"
                    )
        except (OSError, tarfile.TarError) as e:
            raise bad(f"it is truncated or corrupt ({e})") from None
    if manifest is None:
        raise bad("it has no manifest.json")
    listed = set(manifest["files"].values())
    unlisted = sorted(set(files) - listed)
    if unlisted:
        raise bad(f"it carries a file its manifest does not list (files/{unlisted[0]})")
    if manifest["version"].get("digest") != manifest_digest(manifest["files"]):
        raise bad("the version's digest does not match its file list (the manifest was edited)")
    for e in entries:  # one adapter's entries, so not contiguous: each must match its own hash
        fields = (e.get("when"), e.get("who"), e.get("action"), e.get("name"), e.get("version"))
        text = json.dumps(e.get("details"), sort_keys=True, ensure_ascii=False)
        if audit.entry_hash(str(e.get("prev_hash")), *fields, text) != e.get("hash"):
            raise bad(f"audit entry {e.get('seq')} does not match its hash (the audit entries were edited)")
    for path, sha in manifest["files"].items():
        if sha not in files:
            raise bad(f"the file {path!r} it lists is missing")
        if file_sha256(files[sha]) != sha:
            raise bad(f"the file {path!r} does not match its recorded sha256 (tampered or damaged)")
    return manifest, files, entries


def _entries(data: bytes, bad: Any) -> list[dict[str, Any]]:
    try:
        entries = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"audit.jsonl is not JSON lines ({e})") from None
    if not all(isinstance(e, dict) and isinstance(e.get("hash"), str) for e in entries):
        raise bad("audit.jsonl holds something other than audit entries")
    return entries


def _manifest(data: bytes, bad: Any) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"manifest.json is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad("manifest.json is not a peftkit bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {manifest.get('format_version')!r}; this peftkit reads {FORMAT_VERSION}")
    version = manifest.get("version")
    if (
        not isinstance(version, dict)
        or not isinstance(version.get("name"), str)
        or not isinstance(version.get("number"), int)
    ):
        raise bad("manifest.json's version is malformed (a name and a number at least)")
    files = manifest.get("files")
    ok = isinstance(files, dict) and files and all(_file_entry(p, s) for p, s in files.items())
    if not ok:
        raise bad("manifest.json's file list is malformed (plain file names and sha256 hashes only)")
    return manifest


def _file_entry(path: Any, sha: Any) -> bool:
    """A plain file name (no directory, not only dots) with a sha256: all a manifest may list."""
    return (
        isinstance(path, str)
        and re.fullmatch(r"[\w.\-]{1,200}", path) is not None
        and path.strip(".") != ""
        and isinstance(sha, str)
        and re.fullmatch(r"[0-9a-f]{64}", sha) is not None
    )


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
