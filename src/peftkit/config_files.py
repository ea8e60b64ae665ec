"""Config files and typed configs, shared by every command that reads one (train, compare, tune, serve):
YAML read safely with errors that name the file, line and fix, and dataclasses built from plain data
with each key and value checked by name."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, did_you_mean
from .values import check_keys_are_text, int_limit_problem, number_from_text, surrogate_problem
from .values import short_repr as _short


def read_config_file(path: str | Path, kind: str = "config") -> dict[str, Any]:
    """The mapping of keys in a YAML config file (empty for an empty file); a missing file, bad YAML or
    anything but a mapping is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    loaded = read_yaml(path)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, found {type(loaded).__name__}")
    return dict(loaded or {})


def read_yaml(path: Path) -> Any:
    """The YAML in `path`; every way a file can be unreadable becomes a ConfigError naming it."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(f"{path} is UTF-16 text; re-save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save it as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_problem(path, e)) from None
    except RecursionError:
        raise ConfigError(f"{path} nests lists or mappings too deeply to be a config") from None


class _ConfigYamlError(yaml.MarkedYAMLError):
    """Well-formed YAML that is no config: `problem` says what and how to fix it."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with two more errors that name the line. A scalar it cannot convert:
    PyYAML lets ValueError escape from `!!float abc`, dates like 2024-13-45 and integers of more than
    4300 digits (Python's int-from-text limit). A key given twice: YAML keeps the last silently."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError) as e:
            problem = int_limit_problem(e) if isinstance(e, ValueError) else str(e)
            raise _ConfigYamlError(
                problem=f"cannot read this value ({problem}); quote it to keep it as text",
                problem_mark=node.start_mark,
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _ConfigYamlError(
                        problem=f"the key {key_node.value!r} is given twice; keep one",
                        problem_mark=key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    """One line (the CLI prints one `error:` line): where, what, and the fix."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return f"{path} is not valid YAML: {' '.join(str(e).split())}"
    mark = e.problem_mark or e.context_mark
    where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    if isinstance(e, _ConfigYamlError):
        return f"{where}: {e.problem}"
    what = "; ".join(part for part in (e.context, e.problem) if part)
    return f"{where}: not valid YAML ({what})"


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from plain data, checking keys and value types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, found {_short(data)}")
    known = {f.name: f for f in fields(cls)}
    check_keys_are_text(data, f"config{' ' + prefix.rstrip('.') if prefix else ''}", known)
    for key in data:
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix}{key!r}{did_you_mean(key, known)}; "
                f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}"
            )
    hints = type_hints(cls)
    values = {key: coerce(hints[key], value, prefix + key) for key, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` checked against type `hint` (ints are accepted for floats; tuples from lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, str):
        _check_text(value, key)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if hasattr(hint, "from_dict"):  # a method's config: it checks its own keys and values
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, found {_short(value)}")
            try:
                return hint.from_dict(value)
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
        return build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"invalid value for {key}: {_short(value)}; expected {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"invalid value for {key}: {_short(value)}; expected null")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"invalid value for {key}: {_short(value)}; expected one of {', '.join(map(repr, args))}"
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = number_from_text(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            try:
                return float(number)
            except OverflowError:  # an int beyond the float range
                raise ConfigError(
                    f"invalid value for {key}: {_short(value)}; expected a finite number"
                ) from None
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"invalid value for {key}: {_short(value)}; expected {_describe(hint)}")


def _check_text(value: str, key: str) -> None:
    # A lone surrogate (a YAML "\ud800" escape, or undecodable bytes on the command line) is not
    # text any file or tokenizer can take; it would fail far from here.
    problem = surrogate_problem(value)
    if problem:
        raise ConfigError(
            f"invalid value for {key}: {_short(value)} {problem}; fix the escape or the text's encoding"
        )


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for {key}: {_short(value)}; expected {expected}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
