"""`peftkit <command>`: every subcommand is a plain typed function, and argparse is generated from it.

A command's docstring is its `--help`: the first paragraph is the one-line summary, the rest (minus
the `Args:` section) the description, and each `Args:` entry documents one parameter. Parameters
without a default become positionals, those with one become `--kebab-case` options whose default
(shown in `--help`) is read from the signature, so it lives in one place. Supported types: bool
(`--flag/--no-flag`), int, float, str, Path, Literal[...] (choices), list[str], and `X | None`.

The CLI owns its wiring: `COMMAND_MAP` names each command's function by module and name, and only the
module of the command being run is imported (`--help` imports them all). Command modules import
nothing from here; their parameter markers come from `peftkit.command_args`. Adding a command =
writing a typed function in its area's `commands.py` and adding one line to the map.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from ..command_args import ConfigOptions, Positional
from ..errors import PeftkitError
from ..terminal import printable
from .argparsing import Parser, merge_aliases
from .generator import add_function, parse_docstring

Command = Callable[..., int | None]

COMMAND_MAP: dict[str, str] = {
    "info": "peftkit.cli.tools:info",
    "merge": "peftkit.cli.tools:merge",
    "combine": "peftkit.cli.tools:combine",
    "compress": "peftkit.cli.tools:compress",
    "tour": "peftkit.cli.tour:tour",
    "demo": "peftkit.cli.demo:demo",
    "train": "peftkit.train.commands:train",
    "eval": "peftkit.eval.commands:eval",
    "generate": "peftkit.eval.commands:generate",
    "chat": "peftkit.eval.commands:chat",
    "serve": "peftkit.serve.commands:serve",
    "compare": "peftkit.compare.commands:compare",
    "tune": "peftkit.tune.commands:tune",
}
"""Subcommand name -> "module:function" that implements it, in the order `--help` lists them."""

REGISTRY_HELP = "the adapter registry: immutable versions, stages, rollback and an audit log"
GROUP_MAP: dict[str, tuple[str, dict[str, str]]] = {
    "registry": (
        REGISTRY_HELP,
        {
            name: f"peftkit.registry.commands:registry_{name}"
            for name in (
                "register",
                "list",
                "show",
                "path",
                "promote",
                "gate",
                "demote",
                "rollback",
                "delete",
                "gc",
                "export",
                "import",
                "history",
                "check",
            )
        },  # fmt: skip
    ),
    "export": (
        "write models and adapters for llama.cpp and Ollama (GGUF files)",
        {
            "gguf": "peftkit.export.commands:export_gguf",
            "gguf-adapter": "peftkit.export.commands:export_gguf_adapter",
        },
    ),
    "monitor": (
        "watch production adapters: drift, re-evaluation, A/B decisions, reports",
        {
            name: f"peftkit.monitor.commands:monitor_{name}"
            for name in ("watch", "drift", "reeval", "run", "ab", "report")
        },
    ),
}
"""Command group (`peftkit registry ...`) -> (its one-line help, {subcommand: "module:function"})."""

COMMANDS: dict[str, Command] = {}
"""Subcommand name -> its function, once `load_commands()` (or `build_parser()`) imported them."""
GROUPS: dict[str, tuple[str, dict[str, Command]]] = {}
"""Command group -> (its one-line help, {subcommand: function}), filled the same way."""

# Errors caused by the user's input or the user's files: one `error:` line with exit code 2, no
# traceback. Any OSError names a path the user gave or its filesystem (a name too long, a full disk).
USER_ERRORS = (PeftkitError, OSError)

__all__ = ["COMMANDS", "COMMAND_MAP", "GROUPS", "GROUP_MAP", "ConfigOptions", "Positional", "build_parser",
           "load_commands", "main", "parse_docstring"]  # fmt: skip


def load_command(target: str) -> Command:
    """The function a map entry ("module:function") names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def load_commands() -> tuple[dict[str, Command], dict[str, tuple[str, dict[str, Command]]]]:
    """Import every command's module: (COMMANDS, GROUPS), filled."""
    COMMANDS.update({name: load_command(target) for name, target in COMMAND_MAP.items()})
    for group, (about, entries) in GROUP_MAP.items():
        GROUPS[group] = (about, {name: load_command(target) for name, target in entries.items()})
    return COMMANDS, GROUPS


def build_parser(commands: dict[str, Command] | None = None, *, only: str | None = None) -> Parser:
    """The `peftkit` parser with one subcommand per function in the map (or per entry of `commands`,
    without the groups); `only`: just that command or group, importing only its module."""
    from ..version import __version__

    if commands is None and only is None:
        commands, groups = load_commands()
    elif commands is None:
        commands = {only: load_command(COMMAND_MAP[only])} if only in COMMAND_MAP else {}
        about, entries = GROUP_MAP.get(only, ("", {}))
        groups = {only: (about, {n: load_command(t) for n, t in entries.items()})} if entries else {}
    else:
        groups = {}
    parser = Parser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning (LoRA, rsLoRA, DoRA) in the HF PEFT format.",
        epilog="Set PEFTKIT_DEBUG=1 to see tracebacks. `peftkit COMMAND --help` documents each command.",
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, fn in commands.items():
        add_function(subparsers, name, fn)
    for group, (summary, functions) in groups.items():
        sub = subparsers.add_parser(group, help=summary, description=summary)
        inner = sub.add_subparsers(title=f"{group} commands", metavar="COMMAND", required=True)
        for name, fn in functions.items():
            add_function(inner, name, fn)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The command `argv` runs, when its first word names one; else None (`--help`, a typo: the whole
    parser answers, with every command listed)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMAND_MAP or first in GROUP_MAP else None


def main(argv: list[str] | None = None) -> int:
    """Run `peftkit` with `argv` (default: sys.argv[1:]); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_named(argv))
    try:
        namespace, extras = parser.parse_known_args(argv)
        args = vars(namespace)
        command_parser = args.pop("_parser", parser)
        if extras:  # reported with the command's usage, not the top-level one
            command_parser.error(command_parser.unknown_options(extras))
        merge_aliases(command_parser, args)
    except SystemExit as e:  # --help, --version, usage errors (argparse exits 2 for those)
        return int(e.code or 0)
    fn = args.pop("_fn")
    for key in [k for k in args if ":" in k]:  # ConfigOptions values, gathered per parameter
        pname, option = key.split(":", 1)
        if not isinstance(args.get(pname), dict):
            args[pname] = {}
        args[pname][option] = _yaml_value(args.pop(key))
    try:
        return int(fn(**args) or 0)
    except BrokenPipeError:  # the reader went away (`peftkit info ... | head`): nothing to report
        # Python's documented recipe: point stdout at devnull so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as e:
        if os.environ.get("PEFTKIT_DEBUG", "") not in ("", "0"):
            raise
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
        if isinstance(e, OSError) and e.filename2:  # a rename or link: both paths matter
            message += f" -> {e.filename2}"
        print(f"error: {printable(message, keep=chr(10))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP where a command stops on them as on Ctrl-C
        from ..experiment.stopping import report_stop

        return report_stop(e)  # "interrupted" or "stopped by SIGTERM"; 128 + the signal, as a shell says


def _yaml_value(text: str) -> Any:
    """A command-line value read as YAML ("8" -> 8, "null" -> None, "[a, b]" -> list); text on failure."""
    import yaml

    if not text.strip():
        return text  # `--output_dir ''` is a blank string (YAML would read it as null)
    try:
        return yaml.safe_load(text)
    except (
        yaml.YAMLError,
        ValueError,
        RecursionError,
    ):  # 5000-digit ints, deep nesting: the config names them
        return text


if __name__ == "__main__":
    sys.exit(main())
