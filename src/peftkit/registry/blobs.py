"""The registry's content-addressed file store: every file kept once, named by its sha256.

    <root>/files/sha256/1f/1f2e...   a file's bytes, read-only; the name is the hash of the content

Writes go to a temporary name in the same directory, are fsynced, then renamed into place (and the
directory fsynced), so a crash leaves either no file or the whole file, never part of one under its
final name. Every read verifies the hash: a tampered or truncated file is refused by name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import RegistryIntegrityError

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class BlobStore:
    """Files by content hash under `root/files/sha256/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "files" / "sha256"

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def put(self, source: Path, sha: str | None = None) -> str:
        """Store a copy of `source` (if not stored already) and return its sha256."""
        sha = sha or file_sha256(source)
        target = self.path(sha)
        if target.is_file():
            os.utime(target)  # fresh again: gc's grace period protects a registration that reuses it
            return sha
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha[:12]}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            if file_sha256(Path(tmp)) != sha:  # the source changed while it was copied
                raise RegistryIntegrityError(f"{source} changed while it was being stored; register it again")
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return sha

    def verify(self, sha: str, what: str) -> Path:
        """The stored file's path after checking its bytes hash to `sha`; else RegistryIntegrityError
        naming `what` (e.g. "support-bot@3: adapter_model.safetensors")."""
        path = self.path(sha)
        if not path.is_file():
            raise RegistryIntegrityError(f"{what}: its stored file {path} is missing")
        found = file_sha256(path)
        if found != sha:
            raise RegistryIntegrityError(
                f"{what}: its stored file {path} was changed or truncated (sha256 {found[:12]}..., recorded "
                f"{sha[:12]}...); restore it from a backup or a bundle, or register the adapter again"
            )
        return path

    def all(self) -> list[str]:
        """Every stored hash (temporary files left by a crash are not counted)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.glob("*/*") if not p.name.startswith("."))

    def partial(self) -> list[Path]:
        """Temporary files of copies that never finished (a writer crashed before its rename)."""
        return sorted(self.root.glob("*/.*.tmp")) if self.root.is_dir() else []


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
