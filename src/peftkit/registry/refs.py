"""References to registered adapter versions, as people type them.

name                 the production version of `name`
name@production      the same; name@staging, name@draft likewise
name@3               version 3
name@sha256:1f2e...  the version whose digest starts with that prefix (at least 8 hex digits)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RequestError

STAGES = ("draft", "staging", "production", "archived")
MAX_VERSION = 2**63 - 1  # a 64-bit integer column on both backends
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{8,64})")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of `stage`, `number`, `digest` is set."""

    name: str
    stage: str | None = None
    number: int | None = None
    digest: str | None = None  # a hex prefix of the version's digest

    def __str__(self) -> str:
        if self.number is not None:
            return f"{self.name}@{self.number}"
        if self.digest is not None:
            return f"{self.name}@sha256:{self.digest}"
        return f"{self.name}@{self.stage}"


def check_name(name: str) -> str:
    """An adapter name the registry accepts, or a RequestError saying what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError(
            f"adapter name {name!r} is not valid in the registry: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. support-bot or dates_v2)"
        )
    return name


def parse_ref(text: str) -> Ref:
    """A reference from its text; a bad one is a RequestError that shows the accepted forms."""
    forms = "NAME, NAME@production, NAME@staging, NAME@3 or NAME@sha256:<8+ hex digits>"
    if not isinstance(text, str) or text.count("@") > 1:
        raise RequestError(f"bad adapter reference {text!r}; write {forms}")
    name, at, selector = text.partition("@")
    check_name(name)
    if not at:
        return Ref(name, stage="production")
    if selector in STAGES:
        return Ref(name, stage=selector)
    if selector.isdigit() and int(selector) > 0 and not selector.startswith("0"):
        if int(selector) > MAX_VERSION:
            raise RequestError(f"bad adapter reference {text!r}: version numbers go up to {MAX_VERSION}")
        return Ref(name, number=int(selector))
    match = _DIGEST.fullmatch(selector.lower())
    if match:
        return Ref(name, digest=match.group(1))
    raise RequestError(
        f"bad adapter reference {text!r}: {selector!r} is no stage, version or digest; write {forms}"
    )
