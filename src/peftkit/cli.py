"""`peftkit <command>`: every subcommand is a plain typed function, and argparse is generated from it.

A command's docstring is its `--help`: the first paragraph is the one-line summary, the rest (minus
the `Args:` section) the description, and each `Args:` entry documents one parameter. Parameters
without a default become positionals, those with one become `--kebab-case` options whose default
(shown in `--help`) is read from the signature, so it lives in one place. Supported types: bool
(`--flag/--no-flag`), int, float, str, Path, Literal[...] (choices), list[str], and `X | None`.

Adding a command = writing a typed function and decorating it with `@command`.
"""

from __future__ import annotations

import argparse
import inspect
import json as _json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from .argparsing import ALIAS_SUFFIX, AliasOf, Parser, aliases_for, canonical, default_text, merge_aliases
from .errors import PeftkitError
from .terminal import printable

COMMANDS: dict[str, Callable[..., int | None]] = {}
"""Subcommand name -> the function that implements it."""
GROUPS: dict[str, tuple[str, dict[str, Callable[..., int | None]]]] = {}
"""Command group (`peftkit registry ...`) -> (its one-line help, {subcommand: function})."""

# Errors caused by the user's input or the user's files: one `error:` line with exit code 2, no
# traceback. Any OSError names a path the user gave or its filesystem (a name too long, a full disk).
USER_ERRORS = (PeftkitError, OSError)


# Modules whose @command functions join the CLI; imported when the parser is built, so
# `import peftkit.cli` stays light.
COMMAND_MODULES = (
    "peftkit.train.commands",
    "peftkit.eval.commands",
    "peftkit.registry.commands",
    "peftkit.serve.commands",
    "peftkit.compare.commands",
    "peftkit.tune.commands",
)


class Positional:
    """Marks a parameter that has a default as an optional positional argument (`CONFIG` in
    `peftkit train [CONFIG]`): `config: Annotated[Path | None, Positional()] = None`."""


class ConfigOptions:
    """Marks a `dict[str, Any]` parameter whose entries come from `--KEY VALUE` options, one per config
    key (dotted for nested sections, e.g. `--lora.r 8`). `keys()` gives {key: help} and `defaults()`
    {key: default} (shown in `--help` as YAML); values are parsed as YAML (`8`, `1e-4`, `null`,
    `[q_proj, v_proj]`) and checked by the config itself.

        overrides: Annotated[dict, ConfigOptions(field_help, field_defaults)] | None = None
    """

    def __init__(
        self, keys: Callable[[], dict[str, str]], defaults: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self.keys = keys
        self.defaults = defaults or dict


def group_command(group: str, help: str) -> Callable[[Callable[..., int | None]], Callable[..., int | None]]:
    """Register a function as `peftkit GROUP NAME`, NAME being the function's name without the
    `GROUP_` prefix (`registry_show` -> `peftkit registry show`)."""

    def register(fn: Callable[..., int | None]) -> Callable[..., int | None]:
        name = fn.__name__.removeprefix(f"{group}_").replace("_", "-")
        GROUPS.setdefault(group, (help, {}))[1][name] = fn
        return fn

    return register


def command(fn: Callable[..., int | None]) -> Callable[..., int | None]:
    """Register `fn` as the subcommand `fn.__name__` (underscores become dashes)."""
    COMMANDS[fn.__name__.replace("_", "-")] = fn
    return fn


# -- the generator -------------------------------------------------------------------------------
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
    option (the `_` spelling is accepted too, see `peftkit.argparsing`), NAME for a positional."""
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
        if pname not in param_help:
            raise TypeError(f"{fn.__name__}: parameter {pname!r} is not documented in its Args: section")
        metadata = getattr(_unwrap_optional(hints[pname]), "__metadata__", ())
        options = [m for m in metadata if isinstance(m, ConfigOptions)]
        if options:
            parser.set_defaults(**{pname: param.default})
            _add_config_options(parser, pname, param_help[pname], options[0], taken=set(params))
            continue
        if any(isinstance(m, Positional) for m in metadata):
            hint = _unwrap_optional(typing.get_args(_unwrap_optional(hints[pname]))[0])
            parser.add_argument(
                pname,
                nargs="?",
                type=hint,
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


def build_parser(commands: dict[str, Callable] | None = None) -> argparse.ArgumentParser:
    """The `peftkit` parser with one subcommand per registered function."""
    import importlib

    from .version import __version__

    for module in COMMAND_MODULES:
        importlib.import_module(module)

    parser = Parser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning (LoRA, rsLoRA, DoRA) in the HF PEFT format.",
        epilog="Set PEFTKIT_DEBUG=1 to see tracebacks. `peftkit COMMAND --help` documents each command.",
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, fn in (COMMANDS if commands is None else commands).items():
        add_function(subparsers, name, fn)
    for group, (summary, functions) in GROUPS.items() if commands is None else ():
        sub = subparsers.add_parser(group, help=summary, description=summary)
        inner = sub.add_subparsers(title=f"{group} commands", metavar="COMMAND", required=True)
        for name, fn in functions.items():
            add_function(inner, name, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `peftkit` with `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
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
        from .experiment.stopping import report_stop

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


# -- commands ------------------------------------------------------------------------------------
@command
def info(adapter_dir: Path, json: bool = False, registry: str | None = None) -> None:
    """Describe a saved adapter: method, rank, alpha, targets, size, dtype and the base it was trained on.

    Reads the files only (no base model is loaded); works on adapters saved by peftkit and by HF PEFT.
    The rank is read from the tensors; a config that disagrees with them is reported.

    Args:
        adapter_dir: the adapter directory (adapter_config.json + adapter_model.safetensors)
        json: print the facts as one JSON object instead of text
        registry: the adapter registry that NAME@N references come from (default: $PEFTKIT_REGISTRY,
            else ~/.peftkit/registry; a directory or a postgresql:// URL)
    """
    from .tools.info import adapter_info, format_info

    facts = adapter_info(adapter_dir, registry)
    print(_json.dumps(facts, indent=2) if json else format_info(facts))


@command
def merge(
    base: str,
    adapter_dir: Path,
    out_dir: Path,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    overwrite: bool = False,
    check_base: bool = True,
    quantize: Literal["nf4"] | None = None,
    registry: str | None = None,
) -> None:
    """Fold an adapter into its base model and write a plain HF model directory (with its tokenizer).

    The result loads with `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`, no peftkit
    needed. The adapter is checked against the base (fingerprint, names, shapes) before merging.
    A base directory without tokenizer files merges too (the output then has none either).

    Args:
        base: the base model: a built-in name (smollm2-135m), an HF model directory, or a .gguf file
        adapter_dir: the adapter directory to merge
        out_dir: where to write the merged model (not the base's or the adapter's directory)
        dtype: the dtype to load the base in and to save (auto: merged in float32, saved in the
            checkpoint's own dtype)
        overwrite: replace OUT_DIR if it holds a model (never a directory of other files, your home
            or the working directory)
        check_base: refuse an adapter whose recorded base fingerprint differs from this base's
            (--no-check-base merges it anyway; names and shapes are still checked)
        quantize: nf4: merge a QLoRA adapter into the base as it trained on: the 4-bit base,
            dequantized (the output is full precision; re-quantizing would lose the update). Prints
            how far the merged model's logits are from the unmerged 4-bit model's
        registry: the adapter registry that NAME@N references come from (default: $PEFTKIT_REGISTRY,
            else ~/.peftkit/registry; a directory or a postgresql:// URL)
    """
    from .tools.merge import merge_to_dir

    merge_to_dir(
        base,
        adapter_dir,
        out_dir,
        dtype=dtype,
        overwrite=overwrite,
        check_base=check_base,
        quantize=quantize,
        registry=registry,
    )


@command
def combine(
    out: Path,
    adapters: list[str] = [],  # noqa: B006 (argparse fills it; the function never mutates it)
    weights: list[float] = [],  # noqa: B006
    how: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"] = "svd",
    density: float | None = None,
    rank: int | None = None,
    base: str | None = None,
    seed: int | None = None,
    check_base: bool = True,
    registry: str | None = None,
) -> None:
    """Combine LoRA adapters of one base into a new LoRA adapter, as HF PEFT's add_weighted_adapter does.

    linear/ties/dare_* merge the A and B factors (the adapters need one rank); cat puts them side by
    side (exact, rank = the sum); svd truncates the weighted sum of the deltas to --rank and prints
    its relative reconstruction error. docs/combine.md has the rules. Saved in the PEFT format.

    Args:
        out: the directory to write the new adapter to
        adapters: the LoRA adapter directories (or registry references) to combine
        weights: one weight per adapter (negative subtracts); unset, each adapter weighs 1
        how: how to combine them
        density: ties, dare_*: the fraction of each task tensor kept, in (0, 1]
        rank: svd: the new adapter's rank; unset, the largest input rank
        base: the base model; unset, the one the first adapter records
        seed: dare_*: seed for the random masks; unset, torch's global generator
        check_base: refuse adapters whose recorded base fingerprint differs from --base's
            (--no-check-base loads them anyway; names and shapes are still checked)
        registry: the adapter registry that NAME@N references come from (default: $PEFTKIT_REGISTRY,
            else ~/.peftkit/registry; a directory or a postgresql:// URL)
    """
    from .tools.combine import combine_files

    result = combine_files(
        out,
        list(adapters),
        list(weights),
        how,
        density=density,
        rank=rank,
        base=base,
        seed=seed,
        check_base=check_base,
        registry=registry,
    )
    print(f"wrote {out}: {result.summary()}")


@command
def tour(
    model: str = "smollm2-135m",
    out: Path = Path("out/tour"),
    dtype: Literal["float32", "bfloat16"] = "float32",
    max_new_tokens: int = 20,
) -> int:
    """Tour the adapter library on a real model in about a minute, checking every claim as it runs.

    Loads the base, attaches LoRA adapters, checks a zero-initialised adapter changes nothing,
    generates with two (untrained, random) adapters and with both in one mixed batch, merges,
    saves, inspects and exports a merged model that plain transformers reloads.

    Args:
        model: the base model (a built-in name, an HF model directory or a .gguf file)
        out: directory for the tour's files (the saved adapter and the merged model)
        dtype: compute dtype. bfloat16 runs matrix products faster on CPUs with AVX-512/AMX, but its
            rounding makes mixed-batch and merged generations drift from the per-adapter ones, so the
            tour's exact-equality checks can fail in bfloat16
        max_new_tokens: tokens to generate per prompt (greedy)
    """
    from .tour import run_tour

    return 0 if run_tour(model=model, out=out, dtype=dtype, max_new_tokens=max_new_tokens) else 1


@command
def demo(
    task: Literal["dates", "extract", "sentiment"] = "dates",
    steps: int = 80,
    out: Path = Path("out/demo"),
    base: str = "smollm2-135m",
    n_test: int = 100,
    min_score: float = 0.9,
) -> int:
    """The main job: teach the default model a built-in task with LoRA, then show before and after.

    Fine-tunes the base with LoRA (r=16, every linear layer) on the task's training split, scores the
    base model and the adapter side by side on held-out examples (in the same mixed batches), saves
    the adapter, the loss curve (PNG), metrics and TensorBoard logs, and shows the adapter answering
    fresh, hand-written inputs. Exits 1 if the adapter misses min_score. A few minutes on a 2-core CPU.

    Args:
        task: the built-in task to learn
        steps: optimizer steps (8 examples each)
        out: directory for the run (adapter, loss.png, metrics, config); new, empty, or an earlier
            demo run, which is replaced (any other directory is refused)
        base: the base model (a built-in name, an HF model directory or a .gguf file)
        n_test: held-out examples to score base and adapter on
        min_score: the adapter's held-out score the demo expects
    """
    from .demo import run_demo

    return 0 if run_demo(task, steps, out, base, n_test, min_score) else 1


if __name__ == "__main__":
    sys.exit(main())
