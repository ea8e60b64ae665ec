"""The CLI generator: an argparse subcommand built from a typed function's signature, type hints and
docstring (see `peftkit.cli`). Options take both spellings (`--max-steps`, `--max_steps`): see
`peftkit.cli.argparsing`."""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..command_args import ConfigOptions, Help, Positional
from .argparsing import ALIAS_SUFFIX, AliasOf, aliases_for, canonical, default_text


def parse_docstring(fn: Callable) -> tuple[str, str, dict[str, str]]:
    """(summary, description, {param: help}) from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    body, _, args_text = doc.partition("\nArgs:\n")
    params: dict[str, str] = {}
    current = None
    for line in args_text.splitlines():
        stripped = line.strip()
        if not stripped or not line.startswith((" ", "\t")):
            break  # the Args section ends at a blank or unindented line
        name, sep, text = stripped.partition(":")
        if sep and name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
            current, params[name] = name, text.strip()
        elif current:
            params[current] += " " + stripped
    summary = body.split("\n\n", 1)[0].replace("\n", " ").strip()
    return summary, body.strip(), params


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _argument(name: str, hint: Any, default: Any, help_text: str) -> tuple[list[str], dict[str, Any]]:
    """The `add_argument` call (flags, keyword arguments) for one parameter: `--kebab-case` for an
    option (the `_` spelling is accepted too, see `peftkit.cli.argparsing`), NAME for a positional."""
    hint = _unwrap_optional(hint)
    origin = typing.get_origin(hint)
    positional = default is inspect.Parameter.empty
    kw: dict[str, Any] = {"help": help_text.replace("%", "%%")}
    if hint is bool:
        if positional:
            raise TypeError(f"bool parameter {name!r} needs a default (it becomes --flag/--no-flag)")
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        choices = typing.get_args(hint)
        kw.update(choices=choices, type=type(choices[0]))
    elif origin in (list, tuple):
        item = typing.get_args(hint)[0]
        kw.update(nargs="+" if positional else "*", type=item)
        if not positional and not default:  # `--adapter a --adapter b` is both, not the last one alone
            kw["action"] = "extend"
    elif hint in (int, float, str, Path):
        kw["type"] = hint
    else:
        raise TypeError(f"parameter {name!r}: the CLI generator does not support type {hint!r}")
    if positional:
        kw["metavar"] = name.upper()
        return [name], kw
    kw["default"] = default
    flag = "--" + name.replace("_", "-")
    kw["help"] += default_text(default, flag=flag).replace("%", "%%")
    return [flag], {"dest": name, **kw}


def add_function(subparsers: Any, name: str, fn: Callable) -> argparse.ArgumentParser:
    """Add subcommand `name` to `subparsers`, built from `fn`'s signature, type hints and docstring."""
    summary, description, param_help = parse_docstring(fn)
    parser = subparsers.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(fn, include_extras=True)
    params = inspect.signature(fn).parameters
    for pname, param in params.items():
        metadata = getattr(_unwrap_optional(hints[pname]), "__metadata__", ())
        shared = [m.text for m in metadata if isinstance(m, Help)]
        if pname not in param_help and not shared:
            raise TypeError(f"{fn.__name__}: parameter {pname!r} is not documented in its Args: section")
        param_help.setdefault(pname, shared[0] if shared else "")
        if shared:  # the type only carried the help: argparse sees the type inside
            hints[pname] = typing.get_args(_unwrap_optional(hints[pname]))[0]
            metadata = ()
        options = [m for m in metadata if isinstance(m, ConfigOptions)]
        if options:
            parser.set_defaults(**{pname: param.default})
            _add_config_options(parser, pname, param_help[pname], options[0], taken=set(params))
            continue
        if any(isinstance(m, Positional) for m in metadata):
            hint = _unwrap_optional(typing.get_args(_unwrap_optional(hints[pname]))[0])
            many = typing.get_origin(hint) is list  # `BASE [ADAPTER ...] OUT`: any number, maybe none
            parser.add_argument(
                pname,
                nargs="*" if many else "?",
                type=typing.get_args(hint)[0] if many else hint,
                default=param.default,
                metavar=pname.upper(),
                help=param_help[pname],
            )
            continue
        flags, kw = _argument(pname, hints[pname], param.default, param_help[pname])
        aliases = aliases_for(pname, _flags(parser))
        if aliases and not flags[0].startswith("-"):  # a positional: `merge BASE ADAPTER --out DIR` too
            own = "--" + pname.replace("_", "-")
            aliases += [own] if own not in aliases else []
            kw.update(nargs="?", default=None)
            kw["help"] += f" (or {aliases[0]} {kw['metavar']})"
        action = parser.add_argument(*flags, **kw)
        action.help = kw["help"]  # Python 3.10's BooleanOptionalAction appends a second "(default: ...)"
        _add_aliases(parser, aliases, flags, kw)
    parser.set_defaults(_fn=fn, _parser=parser)
    return parser


def _add_config_options(
    parser: argparse.ArgumentParser, pname: str, about: str, options: ConfigOptions, taken: set[str]
) -> None:
    """One `--KEY VALUE` option per config key, spelt as in YAML, its default shown as YAML. A key named
    like one of the function's own parameters, or like an alias of one (compare's `out` and the
    training key `output_dir`), is left to the parameter."""
    group = parser.add_argument_group(f"{pname} ({about})")
    defaults = options.defaults()
    owned = {canonical(f) for p in taken for f in [f"--{p}", *aliases_for(p, set())]}
    for key, text in options.keys().items():
        if canonical(f"--{key}") in owned:
            continue
        default = default_text(defaults[key], yaml_style=True) if key in defaults else ""
        kw = {"dest": f"{pname}:{key}", "metavar": "VALUE", "default": argparse.SUPPRESS}
        group.add_argument(f"--{key}", help=(text + default).replace("%", "%%"), **kw)
        _add_aliases(parser, aliases_for(key, _flags(parser)), [f"--{key}"], kw)


def _add_aliases(parser: argparse.ArgumentParser, aliases: list[str], flags: list[str], kw: dict) -> None:
    """Hidden options for `aliases` of the argument added with (`flags`, `kw`): for an option, the
    same action under another name; for a positional, an option whose value `merge_aliases` folds in."""
    if not aliases:
        return
    hidden = {k: v for k, v in kw.items() if k not in ("help", "metavar", "nargs", "default", "dest")}
    if flags[0].startswith("-"):
        parser.add_argument(*aliases, **hidden, dest=kw["dest"], nargs=kw.get("nargs"),
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
    else:
        hidden.pop("action", None)
        parser.add_argument(*aliases, **hidden, dest=flags[0] + ALIAS_SUFFIX, action=AliasOf,
                            default=None, help=argparse.SUPPRESS)  # fmt: skip


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {canonical(flag) for flag in parser._option_string_actions}
