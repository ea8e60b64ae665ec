"""Turning the name or path a user gives `load_base` into a concrete place to load from."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from peftkit.base.cache import file_identity, short_hash
from peftkit.base.catalog import BUILTIN_MODELS, builtin_gguf_path
from peftkit.errors import BaseModelError, did_you_mean


@dataclass(frozen=True)
class Source:
    """Where a base model comes from."""

    kind: Literal["builtin", "gguf", "dir", "hub"]
    """builtin: a GGUF shipped in a package; gguf: a GGUF file; dir: a local HF model directory;
    hub: a Hugging Face hub id."""
    location: str
    """The GGUF file or model directory (absolute), or the hub id."""
    cache_name: str | None = None
    """For GGUF sources: the name of the converted checkpoint's directory under `<cache>/models/`."""


def resolve_source(name_or_path: str) -> Source:
    """Classify `name_or_path`: built-in name, .gguf file, HF model directory, or hub id.

    Raises BaseModelError when it names a local path that cannot be loaded; hub ids are only
    checked for syntax here (loading them is what tells whether they exist).
    """
    if name_or_path in BUILTIN_MODELS:
        gguf = builtin_gguf_path(name_or_path)
        return Source("builtin", str(gguf), cache_name=name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source("dir", str(path.resolve()))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file, pass its path (found: {', '.join(ggufs)})" if ggufs else ""
        raise BaseModelError(
            f"{path} is a directory but not an HF model directory: it has no config.json{hint}"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BaseModelError(
                f"{path} is a file but not a .gguf file; pass a .gguf file or an HF model directory "
                "(one with config.json)"
            )
        # Key the converted copy by path, size and mtime, so editing or replacing the file converts it again.
        return Source(
            "gguf", str(path.resolve()), cache_name=f"gguf-{path.stem}-{short_hash(file_identity(path))}"
        )
    if _looks_like_path(name_or_path):
        raise BaseModelError(
            f"no such file or directory: {path.absolute()}; pass an existing .gguf file, an HF model directory, "
            f"or a built-in name ({_builtin_list()})"
        )
    return Source("hub", name_or_path)


def _looks_like_path(text: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    return (
        text.startswith(("/", "./", "../", "~", "."))
        or os.path.isabs(text)
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith(".gguf")
    )


def _builtin_list() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached right now, or None when it can (or may).

    Without this check an offline machine spends ~25 s in huggingface_hub's retries before
    failing; with it, `load_base` searches only the local HF cache and fails at once.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct probe says nothing about a proxy; let huggingface_hub try it
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {host}:{port}: {err}")

    # A thread bounds the DNS lookup too, which create_connection's timeout does not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout_s:g} s"


def hub_failure_message(name: str, error: BaseException, offline_reason: str | None) -> str:
    """A BaseModelError message listing everything `name` was tried as, ending with the hub error."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hub = f"the Hugging Face hub: {type(error).__name__}: {first_line}"
    if offline_reason:
        hub += f" (the hub is unreachable: {offline_reason}; only the local HF cache was searched)"
    return (
        f"cannot load base model {name!r}. It was tried as:\n"
        f"  - a local directory: no directory {name!r} exists\n"
        f"  - a .gguf file: no file {name!r} exists\n"
        f"  - a built-in name: it is none of {_builtin_list()}{did_you_mean(name, list(BUILTIN_MODELS))}\n"
        f"  - {hub}"
    )
