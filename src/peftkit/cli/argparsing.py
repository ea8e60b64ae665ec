"""The argparse pieces behind `peftkit.cli`'s generated parsers: one spelling of every option shown,
the other accepted; aliases shared by every command (`--adapter`/`--adapters`, `--out`/`--output-dir`);
defaults in `--help` written as the user would type them; and a did-you-mean for an unknown option,
reported with the command's own usage.

Spelling: an option that sets a config key is shown as the key is written in YAML (`--max_steps`,
`--lora.r`); every other option with dashes (`--max-new-tokens`). Either spelling, `_` or `-`, is
accepted everywhere; a prefix of an option is not one (see `Parser`).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

ALIAS_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"adapter", "adapters"}),  # generate/chat say --adapter, eval/serve/combine --adapters
    frozenset({"out", "out_dir", "output_dir"}),  # demo/compare/tune --out, train --output_dir, merge OUT_DIR
)
"""Names that mean one thing in every command: whichever a command has, the others are its aliases."""

ALIAS_SUFFIX = "@alias"
"""The dest suffix of an alias of a positional argument (merged into the positional after parsing)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that accepts both spellings of its options (`--max_steps`, `--max-steps`) and
    says which option was probably meant when one is unknown. Prefixes are not options: argparse's
    abbreviations would read `--lora.rank 4` as `--lora.rank_pattern 4`, and a new option would break
    an abbreviation that worked before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if args is not None:
            args = respell(list(args), self._option_string_actions)
        return super().parse_known_args(args, namespace)

    def unknown_options(self, extras: list[str]) -> str:
        """The 'unrecognized arguments' message for `extras`, with a did-you-mean for each option."""
        known = shown_options(self)
        hints = []
        for arg in extras:
            if arg.startswith("--"):
                name = arg.split("=", 1)[0]
                meant = _other_name(name, known) or _close(name, known)
                if meant:
                    hints.append(f"{name}: did you mean {meant}?")
        text = f"unrecognized arguments: {' '.join(extras)}"
        return text + (f" ({'; '.join(hints)})" if hints else "")


def _close(name: str, known: list[str]) -> str | None:
    """The known option spelt most like `name`."""
    close = difflib.get_close_matches(canonical(name), [canonical(k) for k in known], n=1)
    return known[[canonical(k) for k in known].index(close[0])] if close else None


def _other_name(name: str, known: list[str]) -> str | None:
    """A config option by a name other tools use for it (`--lora.rank` -> `--lora.r`), which no
    spelling check finds."""
    from peftkit.methods.config_fields import ALIASES

    section, dot, key = name[2:].rpartition(".")
    for field in ALIASES.get(key.lower().replace("-", "_"), ()):
        flag = canonical(f"--{section}{dot}{field}")
        found = [k for k in known if canonical(k) == flag]
        if found:
            return found[0]
    return None


def respell(args: list[str], options: dict[str, Any]) -> list[str]:
    """`args` with each `--name` (or `--name=value`) that the parser does not know in the spelling given,
    but knows with `_` and `-` swapped, respelled; after a bare `--`, nothing is touched."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            out.append(_known_spelling(name, options) + eq + value)
        else:
            out.append(arg)
    return out


def _known_spelling(name: str, options: dict[str, Any]) -> str:
    if name in options:
        return name
    for swapped in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
        if swapped in options:
            return swapped
    return name


def canonical(flag: str) -> str:
    """`flag` in its dashed spelling (`--max_steps` -> `--max-steps`), for comparing spellings."""
    return flag.replace("_", "-")


def shown_options(parser: argparse.ArgumentParser) -> list[str]:
    """The option strings `--help` shows (hidden aliases left out)."""
    return [
        flag
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for flag in action.option_strings
        if flag.startswith("--")
    ]


def aliases_for(name: str, taken: set[str]) -> list[str]:
    """The alias flags of parameter (or config key) `name`: the other names of its group, in both
    spellings' canonical form (dashes), minus those in `taken` (canonical flags already in the parser)."""
    for group in ALIAS_GROUPS:
        if name in group:
            flags = ["--" + other.replace("_", "-") for other in sorted(group) if other != name]
            return [f for f in flags if f not in taken and f != "--" + name.replace("_", "-")]
    return []


def merge_aliases(parser: argparse.ArgumentParser, args: dict[str, Any]) -> None:
    """Fold the values given through a positional's alias (`merge BASE ADAPTER --out DIR`) into the
    positional; exactly one of the two must be given (a usage error otherwise)."""
    for key in [k for k in args if k.endswith(ALIAS_SUFFIX)]:
        name, via = key.removesuffix(ALIAS_SUFFIX), args.pop(key)
        flag = "--" + via[0].replace("_", "-") if isinstance(via, tuple) else None
        value = via[1] if isinstance(via, tuple) else None
        if value is not None and args.get(name) is not None:
            parser.error(f"{name.upper()} was given twice (as an argument and as {flag}): give it once")
        if value is not None:
            args[name] = value
        if args.get(name) is None:
            parser.error(f"the following arguments are required: {name.upper()} (or --out {name.upper()})")


class AliasOf(argparse.Action):
    """Stores (alias used, value) for a positional's alias, so `merge_aliases` can name it."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, ((option_string or "")[2:], values))


def default_text(value: Any, *, yaml_style: bool = False, flag: str = "") -> str:
    """` (default: X)` for `--help`, X as the user would type it; '' when there is nothing to show
    (None for an ordinary option, whose help says what unset means; an empty list)."""
    if yaml_style:
        import yaml

        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()  # a plain scalar's document end
        return f" (default: {text})"
    if value is None or value == [] or value == ():
        return ""
    if isinstance(value, bool):
        return f" (default: {flag if value else '--no-' + flag[2:]})"
    if isinstance(value, (list, tuple)):
        return f" (default: {' '.join(map(str, value))})"
    return f" (default: {value})"
