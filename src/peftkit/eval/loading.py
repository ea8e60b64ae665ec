"""How eval, generate, chat and the registry's gate open their model and talk while they do: adapter
names from the command line, `peftkit.tools.opening.open_model` with progress lines, and the notes
peftkit raises on the way shown as one `peftkit: ...` line each.

Library code: commands and the policy import it; it imports no command module.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
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


def load_model(
    base: str,
    adapters: list[tuple[str, Path]],
    dtype: str,
    *,
    check_base: bool = True,
    quantize: str | None = None,
    registry: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for generate and chat, which apply every adapter at once: `open_model` with
    progress lines and peftkit's notes on stderr, and two adapters that cannot share the model refused
    in words a command-line user can act on. check_base=False skips the base-fingerprint check."""
    from peftkit.tools.opening import open_model

    with warnings_as_notes():
        opened = open_model(base, adapters, dtype=dtype, check_base=check_base, quantize=quantize,
                            registry=registry, log=log)  # fmt: skip
    return opened.model, opened.tokenizer


def longest_answer(tokenizer: Any, examples: list) -> int:
    """The longest reference answer in tokens (capped): generation for a data file stops 8 past it."""
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    return min(longest, FILE_MAX_NEW_TOKENS - 8)
