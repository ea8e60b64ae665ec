"""Where commands meet the registry: an adapter argument that is a directory or a registry reference
(or a training run's directory, answered with the adapter inside it), and the audit entry for an adapter loaded onto another base model than the one it records."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFileError, RegistryError, RequestError, UnknownAdapterError
from .refs import parse_ref
from .store import Registry
from .versions import check_not_a_run


def adapter_path(text: str | Path, registry: str | Path | None = None) -> Path:
    """What a command's adapter argument names: an existing path as it is, else a registry reference
    (NAME@3, NAME@production, ...) resolved to a directory of verified files. Every command that takes
    an adapter directory goes through here, so a reference works wherever a directory does."""
    path = Path(text)
    if path.exists():
        check_not_a_run(path)
        return path
    try:
        ref = parse_ref(str(text))
    except RequestError:
        return path  # not a reference either: the caller's "not found" names the path
    try:
        reg = Registry.open(registry, create=False)
    except RegistryError:
        return path  # no registry: the caller's "not found" names the path
    try:
        return reg.resolve(ref)
    except UnknownAdapterError:
        raise AdapterFileError(
            f"no adapter directory {str(text)!r}, and the registry {reg.root} has no adapter named {ref.name!r}"
        ) from None


def audit_base_override(
    directory: Path, base: str, fingerprint: str, registry: str | Path | None = None
) -> None:
    """When `directory` was resolved from the registry and its version records another base fingerprint
    than `fingerprint` (the adapter was loaded anyway, --no-check-base), say so in the audit log."""
    reg = Registry.open(registry, create=False)
    version = reg.version_of_checkout(directory)
    if version is not None and version.base_fingerprint and version.base_fingerprint != fingerprint:
        reg.record_override(version, base, fingerprint)
