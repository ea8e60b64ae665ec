"""Opening the model that eval, generate, chat and the registry's gate run: the base, with the adapters
they name loaded onto it (references resolved, files checked before the slow base load), and the notes
peftkit raises on the way shown as one `peftkit: ...` line each.

Library code: commands and the registry import it; it imports no command module.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, TargetError
from peftkit.terminal import printable

FILE_MAX_NEW_TOKENS = 512  # the cap of --max-new-tokens 0 (auto) for files: longest reference + 8
_PACKAGE = Path(__file__).resolve().parents[1]  # src/peftkit: where peftkit's own warnings come from


def log(message: str) -> None:
    """One `peftkit: ...` progress line on stderr (names come from the user's paths: made printable)."""
    print(f"peftkit: {printable(message)}", file=sys.stderr, flush=True)


@contextmanager
def warnings_as_notes() -> Iterator[None]:
    """Inside the block, a warning peftkit itself raises (e.g. "trained on the full-precision form of
    this base") reaches the user as one `peftkit: MESSAGE` line, not as Python's "FILE:LINE:
    UserWarning: ..." with a source line under it, which reads like a crash. Warnings from other
    libraries keep Python's form: they are theirs to word, and the source line helps report them."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def note(message: Any, category: type, filename: str, lineno: int, *args: Any) -> None:
            if Path(filename).resolve().is_relative_to(_PACKAGE):
                log(" ".join(str(message).split()))  # one line, whatever the message's wrapping
            else:
                show(message, category, filename, lineno, *args)

        warnings.showwarning = note
        yield


def adapter_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """(name, directory) for each --adapters entry: NAME=DIR names the adapter; otherwise the name is
    made from the directory's name (valid and unique: "lora-v1.2" -> "lora-v1_2", a second
    "adapter-best" -> "adapter-best-2"), so no directory name can fail. Never "base" (the base model's row)."""
    from peftkit.naming import adapter_name_problem

    parsed: list[tuple[str | None, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        explicit = bool(sep and name and path) and not Path(spec).exists()  # a directory may contain "="
        parsed.append((name, Path(path)) if explicit else (None, Path(spec)))
    taken: list[str] = []
    for spec, (name, _) in zip(specs, parsed, strict=True):
        if name is not None:
            problem = adapter_name_problem(name, taken)
            if problem:
                raise ConfigError(f"--adapters {spec!r}: adapter name {name!r} {problem}")
            taken.append(name)
    named = []
    for name, path in parsed:
        named.append((name or dir_adapter_name(path, taken), path))
        taken.append(named[-1][0])
    return named


def dir_adapter_name(path: Path, taken: list[str]) -> str:
    """A valid adapter name, not in `taken`, made from the name of the adapter's directory."""
    from peftkit.naming import adapter_name_from

    directory = path.parent if path.is_file() else path  # the adapter may be given as its weights file
    return adapter_name_from(directory.resolve().name, taken)


def resolve_adapters(
    adapters: list[tuple[str, Path]], registry: str | None
) -> tuple[list[tuple[str, Path]], set[str]]:
    """(name, directory) with registry references resolved to their files, each adapter's files read
    (a bad adapter fails before the slow base-model load), and the names that came from the registry."""
    from peftkit.formats.peft import read_adapter
    from peftkit.registry.paths import adapter_path

    from_registry = {name for name, d in adapters if not Path(d).exists()}
    resolved = [(name, adapter_path(d, registry)) for name, d in adapters]  # a reference names files too
    for _, d in resolved:
        read_adapter(d)
    return resolved, from_registry


def attach(
    am: Any, name: str, directory: Path, *, base: str, check_base: bool, registry: str | None, audited: bool
) -> None:
    """Load one adapter onto `am` as `name`; `audited`: it came from the registry, so loading it onto
    another base than its own (check_base=False) goes into the registry's audit log."""
    from peftkit.registry.paths import audit_base_override

    log(f"loading adapter {directory} as {name!r} ...")
    am.load_adapter(directory, name, check_base=check_base)
    if not check_base and audited:
        audit_base_override(directory, base, am.base_fingerprint(), registry)


def load_model(
    base: str,
    adapters: list[tuple[str, Path]],
    dtype: str,
    *,
    check_base: bool = True,
    quantize: str | None = None,
    registry: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer): the base, wrapped in an AdaptedModel with each (name, directory) loaded when
    adapters are given (or the base is 4-bit: the adapted generate decodes it fast). check_base=False
    skips the base-fingerprint check (--no-check-base). For generate and chat, which apply every adapter
    at once: two that cannot share the model are refused in words a command-line user can act on."""
    from peftkit.core.adapted import AdaptedModel

    resolved, from_registry = resolve_adapters(adapters, registry)
    with warnings_as_notes():
        model, tokenizer = load_base_quietly(base, dtype, quantize)
        if not resolved and not quantize:
            return model, tokenizer
        am = AdaptedModel(model)
        for name, d in resolved:
            try:
                attach(am, name, d, base=base, check_base=check_base, registry=registry,
                       audited=name in from_registry)  # fmt: skip
            except TargetError as err:
                if not am.adapters:  # alone on the base: the adapter's own problem, worded by the check
                    raise
                raise TargetError(
                    f"adapter {name!r} cannot be active together with {', '.join(map(repr, am.adapters))}: "
                    f"{str(err).split('. ')[0]}. Give them one at a time (`peftkit eval --adapters A B` "
                    "scores adapters of different methods side by side)"
                ) from None
    return am, tokenizer


def load_base_quietly(base: str, dtype: str, quantize: str | None) -> tuple[Any, Any]:
    """The base model and tokenizer, with a progress line of ours instead of transformers' bars."""
    from transformers.utils import logging as hf_logging

    from peftkit.base import load_base

    hf_logging.disable_progress_bar()
    log(f"loading base model {base} ...")
    return load_base(base, dtype=dtype, quantize=quantize)


def longest_answer(tokenizer: Any, examples: list) -> int:
    """The longest reference answer in tokens (capped): generation for a data file stops 8 past it."""
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    return min(longest, FILE_MAX_NEW_TOKENS - 8)
