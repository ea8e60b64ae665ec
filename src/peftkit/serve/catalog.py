"""What a request's `model` names: the base model, an adapter configured at start (--adapters NAME=DIR),
or a registry reference (NAME, NAME@production, NAME@staging, NAME@3, NAME@sha256:...). Never a path.

A registry reference is resolved to a concrete version on every request, so a promotion or a rollback
is served from the next request on, without a restart. The engine key of a registered version is
`NAME@N`: two versions are two cache entries, and `loader(key)` gives the verified files of exactly
that version, refused when they were trained on another base model.

    catalog = Catalog(["smollm2-135m"], {"bot": Path("runs/bot/adapter-best")}, registry, fingerprint)
    target = catalog.resolve("support@production")   # Target(model="support@production", key="support@4")
    catalog.loader(target.key)                       # the directory the engine loads it from
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    BaseModelMismatchError,
    OtherBaseVersionError,
    PeftkitError,
    RegistryError,
    RequestError,
    UnknownAdapterError,
)
from .types import AdapterLoadError


class ModelNotFoundError(RequestError):
    """A request names no model this server serves (HTTP 404, code model_not_found)."""


def not_found(model: str) -> str:
    """The one message for every name not served (missing, malformed, or another tenant's)."""
    return f"The model `{model}` does not exist."


@dataclass(frozen=True)
class Target:
    """What one request runs on: `key` None is the base model, else the engine's adapter key."""

    model: str  # as the request named it (echoed in the response)
    key: str | None


class Catalog:
    """The models one server answers for. `base_names` are the names the base model answers to (the
    first is the one /v1/models lists); `adapters` maps configured names to their directories."""

    def __init__(
        self,
        base_names: Sequence[str],
        adapters: dict[str, Path] | None = None,
        registry: Any | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        self.base_names = list(dict.fromkeys(base_names))
        self.adapters = dict(adapters or {})
        self.registry = registry  # a peftkit.registry.Registry, or None
        self.base_fingerprint = base_fingerprint
        self.read: dict[
            str, Any
        ] = {}  # name -> its AdapterFiles, read at start-up: the first load takes them
        self.created = int(time.time())
        clash = [n for n in self.adapters if n in self.base_names]
        if clash:
            raise RequestError(f"adapter name {clash[0]!r} is the base model's name; choose another")

    def resolve(self, model: str) -> Target:
        """The target `model` names; ModelNotFoundError when it names nothing served (the same error
        for a malformed reference, a missing name and a missing version, so nothing is revealed)."""
        if model in self.base_names:
            return Target(model, None)
        if model in self.adapters:  # configured names come first: they are what the operator chose
            return Target(model, model)
        if self.registry is not None:
            from ..registry.refs import parse_ref

            try:
                version = self.registry.resolve_version(parse_ref(model))
            except (RequestError, RegistryError):
                pass
            else:
                return Target(model, version.ref)
        raise ModelNotFoundError(not_found(model))

    def loader(self, key: str) -> Any:
        """The adapter for an engine key: a configured name's files as start-up read them (once; its
        directory after that), or a registered version's verified files (refused for another base).
        Failures are AdapterLoadError."""
        if key in self.adapters:
            return self.read.pop(key, None) or self.adapters[key]
        if self.registry is None or "@" not in key:
            raise AdapterLoadError(f"no adapter {key!r} is served")
        try:
            return self.registry.resolve(key, base_fingerprint=self.base_fingerprint)
        except UnknownAdapterError:
            raise AdapterLoadError(f"no adapter {key!r} is served") from None
        except OtherBaseVersionError:  # the registry's override is for Python callers, not for a server
            other = BaseModelMismatchError(
                f"{key} was trained on another base model than this server's (`peftkit registry show {key}` "
                "names it): serve a version trained on this base, or serve this one from a server started "
                "with the base it records"
            )
            raise AdapterLoadError.of(key, other) from None
        except PeftkitError as e:
            raise AdapterLoadError.of(key, e) from None

    def models(self) -> list[dict[str, Any]]:
        """The OpenAI model objects /v1/models lists: the base, the configured adapters, and each
        registered name that has a production version (what a bare NAME serves)."""
        base = self.base_names[0]
        ids = [base, *self.adapters]
        if self.registry is not None:
            production = sorted({v.name for v in self.registry.versions() if v.stage == "production"})
            ids += [n for n in production if n not in ids]
        return [
            {"id": i, "object": "model", "created": self.created, "owned_by": "peftkit", "root": i,
             "parent": None if i == base else base}
            for i in ids
        ]  # fmt: skip
