"""What a registered version is: its record, how it is read from the database, and the facts it keeps
about an adapter directory (read from the files `peftkit train` writes)."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .db import Transaction

COLUMNS = (
    "id, name, number, digest, stage, method, base_model, base_fingerprint, base_quantization, "
    "dataset_hash, parent, created_by, created_at, description, tags, facts"
)


@dataclass(frozen=True)
class Version:
    """One registered version of a named adapter."""

    name: str
    number: int
    digest: str  # sha256 over the sorted (path, file sha256) list: the version's identity
    stage: str
    method: str
    base_model: str | None
    base_fingerprint: str | None
    base_quantization: str | None
    dataset_hash: str | None
    parent: str | None  # the parent version's digest
    created_by: str
    created_at: str
    description: str
    tags: tuple[str, ...]
    facts: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # path in the adapter directory -> sha256

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["tags"] = list(self.tags)
        out["version"] = self.number
        return out


def find(tx: Transaction, where: str, params: tuple[Any, ...]) -> list[Version]:
    """The versions a WHERE clause selects, by name and number, with their files."""
    rows = tx.execute(f"SELECT {COLUMNS} FROM versions WHERE {where} ORDER BY name, number", params)
    out = []
    for row in rows:
        files = dict(tx.execute("SELECT path, sha256 FROM version_files WHERE version_id = ?", (row[0],)))
        out.append(
            Version(*row[1:14], tags=tuple(json.loads(row[14])), facts=json.loads(row[15]), files=files)
        )
    return out


def insert(
    tx: Transaction, name: str, facts: dict[str, Any], files: dict[str, tuple[str, int]], **record: Any
) -> Version:
    """Add the next version of `name` (a draft) inside the caller's transaction, and return it.
    `files` maps each path to its (sha256, size); `record` holds parent, created_by, created_at,
    description and tags."""
    # Numbers are never reused, also after a delete: the log remembers every one ever given.
    row = tx.one(
        "SELECT MAX(n) FROM (SELECT MAX(number) AS n FROM versions WHERE name = ? "
        "UNION ALL SELECT MAX(version) AS n FROM audit WHERE name = ? AND action = 'register') AS t",
        (name, name),
    )
    number = int(row[0] or 0) + 1 if row else 1
    digest = manifest_digest({path: sha for path, (sha, _) in files.items()})
    tx.execute(
        f"INSERT INTO versions ({COLUMNS.removeprefix('id, ')}) VALUES ({', '.join('?' * 15)})",
        (
            name, number, digest, "draft", facts["method"], facts["base_model"], facts["base_fingerprint"],
            facts["base_quantization"], facts["dataset_hash"], record["parent"], record["created_by"],
            record["created_at"], record["description"], json.dumps(sorted(record["tags"])),
            json.dumps(facts["extra"], sort_keys=True),
        ),
    )  # fmt: skip
    version_id = tx.one("SELECT id FROM versions WHERE name = ? AND number = ?", (name, number))[0]
    for path, (sha, size) in sorted(files.items()):
        tx.execute("INSERT INTO version_files VALUES (?, ?, ?, ?)", (version_id, path, sha, size))
    return find(tx, "versions.id = ?", (version_id,))[0]


def adapter_facts(directory: Path) -> dict[str, Any]:
    """What a version records about an adapter directory, read from its files (refused if it is none)."""
    from ..formats import peft as fmt
    from ..identity import AdapterIdentity

    check_not_a_run(directory)
    files = fmt.read_adapter(directory)  # an AdapterFileError for anything that is not an adapter
    spec, _ = fmt.config_from_peft(files.config, files.directory)
    identity = AdapterIdentity.from_metadata(files.metadata)
    extra = {"peft_type": spec.peft_type, "identity": identity.training}
    for sidecar in ("training.json", "summary.json"):
        if (directory / sidecar).is_file():
            extra[sidecar.removesuffix(".json")] = json.loads((directory / sidecar).read_text())
    return {
        "method": spec.name,
        "base_model": identity.base_model or files.config.get("base_model_name_or_path"),
        "base_fingerprint": identity.base_fingerprint,
        "base_quantization": identity.base_quantization,
        "dataset_hash": identity.dataset_hash,
        "extra": extra,
    }


def check_not_a_run(path: Path) -> None:
    """Refuse a training run's directory given where an adapter goes, naming the adapter inside it
    (adapter-best, else adapter-last), or saying that a full fine-tuning run's model is a base model."""
    from ..errors import AdapterFileError
    from ..formats.peft import CONFIG_FILE, WEIGHTS_FILE

    if not path.is_dir() or (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        return
    for inside, why in (
        ("adapter-best", "the lowest validation loss; adapter-last is where the run ended"),
        ("adapter-last", "where the run ended; no validation ran, so it has no adapter-best"),
    ):
        if (path / inside / WEIGHTS_FILE).is_file():
            raise AdapterFileError(
                f"{path} is a training run's directory, not an adapter: give the adapter inside it, "
                f"{path / inside} ({why})"
            )
    model = next((path / m for m in ("model-best", "model-last") if (path / m).is_dir()), None)
    if model is not None:
        raise AdapterFileError(
            f"{path} is a full fine-tuning run's directory: {model} is a whole model, not an adapter; "
            "load it as the base model instead"
        )


def adapter_files(directory: Path) -> list[Path]:
    """The regular files of an adapter directory (top level: an adapter has no subdirectories)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink())


def manifest_digest(files: dict[str, str]) -> str:
    """sha256 over the sorted "path sha256" lines: equal for equal file sets, whatever their order."""
    lines = "".join(f"{path}\t{sha}\n" for path, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def default_user() -> str:
    """Who acts: $PEFTKIT_USER, else the OS user."""
    return os.environ.get("PEFTKIT_USER") or getpass.getuser()


def now() -> str:
    """The time of a record: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
