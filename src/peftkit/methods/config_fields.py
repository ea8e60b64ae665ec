"""What every method's config dataclass shares: documented fields, value checks that name the key and
what would be valid, building from a mapping that names unknown keys with a suggestion, and the
`method_config` decorator that gives a config the `MethodConfig` protocol methods."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, field, fields
from typing import Any, TypeVar

from ..core.layer_types import ALL_LINEAR
from ..errors import AdapterFileError, ConfigError, did_you_mean
from ..values import check_keys_are_text, short_repr


def config_field(default: Any, help: str) -> Any:
    """A dataclass field with its one-line documentation (shown by the CLI and the docs); a callable
    default is a factory (for mutable values)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond the float range
        return False


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for {key}: {short_repr(value)}; expected {valid}")


def check_regex(what: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} ({type(pattern).__name__}) must be a regex string, e.g. 'q_proj'")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{what} is not a valid regular expression: {e}") from None


def check_names(
    key: str,
    value: Any,
    *,
    allow_none: bool,
    allow_regex: bool = True,
    allow_empty: bool = False,
    expected: str | None = None,
) -> None:
    """A list of module names (a tuple by now; non-empty unless allowed), one regex string (if allowed)
    or "all-linear", or None (if allowed). A failure says what was expected: `expected` if given (IA³
    words all of its failures so), else what the value lacks."""
    if value is None:
        check(allow_none, key, value, expected or "a module name, a list of names, or a regex")
        return
    if isinstance(value, str):
        valid = expected or "a non-empty list of module names or a regex string"
        check(allow_regex and bool(value), key, value, valid)
        if value != ALL_LINEAR:
            check_regex(key, value)
        return
    ok = isinstance(value, tuple) and (allow_empty or len(value) > 0)
    ok = ok and all(isinstance(v, str) and v for v in value)
    check(ok, key, value, expected or "a non-empty list of module names")


def from_mapping(cls: type, data: Any, label: str) -> Any:
    """A config of class `cls` from a dict, rejecting unknown keys by name (with a suggestion)."""
    if not isinstance(data, dict):
        article = "an" if label[0] in "AEIOU" else "a"
        raise ConfigError(
            f"{article} {label} config must be a mapping of its fields, found {type(data).__name__}"
        )
    known = [f.name for f in fields(cls)]
    check_keys_are_text(data, f"{label} config", sorted(known))
    check_known_keys(data, known, label)
    return cls(**data)


# Names other tools and papers use for our fields (HF PEFT's own names are ours): a spelling check
# cannot find "r" from "rank", so these are looked up first. Each maps to the fields it may mean, in
# order; the first one the config has is suggested ("dropout" is lora_dropout or adapter_dropout).
ALIASES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("rank", "lora_rank", "lora_r", "dim", "network_dim"), ("r",)),
    **dict.fromkeys(("alpha", "network_alpha", "lora_scale", "scale"), ("lora_alpha", "scaling")),
    **dict.fromkeys(("dropout", "network_dropout"), ("lora_dropout", "adapter_dropout")),
    **dict.fromkeys(("target", "targets", "target_module", "modules", "target_layers"), ("target_modules",)),
    **dict.fromkeys(("exclude", "excluded_modules"), ("exclude_modules",)),
    **dict.fromkeys(("layers", "layer_indices"), ("layers_to_transform",)),
    **dict.fromkeys(("dora",), ("use_dora",)),
    **dict.fromkeys(("rslora", "rs_lora"), ("use_rslora",)),
    **dict.fromkeys(
        ("feedforward", "ff_modules", "feed_forward_modules", "ffn_modules"), ("feedforward_modules",)
    ),
    **dict.fromkeys(("size", "adapter_size", "bottleneck_dim"), ("bottleneck_size",)),
    **dict.fromkeys(("reduction",), ("reduction_factor",)),
    **dict.fromkeys(("activation", "act", "nonlinearity", "act_fn"), ("non_linearity",)),
    **dict.fromkeys(
        ("tokens", "num_tokens", "n_tokens", "virtual_tokens", "prefix_length", "prompt_length"),
        ("num_virtual_tokens",),
    ),
    **dict.fromkeys(("init", "init_weights"), ("init_lora_weights", "init_ia3_weights", "init_weights")),
}


def suggestion(key: str, known: list[str] | set[str]) -> str:
    """' (did you mean X?)' for an unknown config key: a well-known other name for one of our fields
    (rank -> r, alpha -> lora_alpha, targets -> target_modules), else the closest spelling, else ''."""
    normal = key.strip().lower().replace("-", "_")
    for name in ALIASES.get(normal, ()):
        if name in known and name != key:
            return f" (did you mean {name!r}?)"
    return did_you_mean(normal if normal in known else key, known)


def check_known_keys(data: dict[str, Any], known: list[str] | set[str], label: str) -> None:
    """Refuse the first key of `data` that `known` lacks, with a suggestion and the valid keys."""
    unknown = [k for k in data if k not in known]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown {label} config key {key!r}{suggestion(key, known)}; valid keys: {', '.join(sorted(known))}"
        )


def field_docs_of(cls: type) -> dict[str, str]:
    """Each field's one-line documentation (used by the CLI and the docs)."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def defaults_of(cls: type) -> dict[str, Any]:
    """Each field's default as declared (a default derived from other fields, such as the bottleneck
    adapter's target_modules, is declared None)."""
    return {
        f.name: f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        for f in fields(cls)
    }


# -- a config from the method part of an adapter_config.json --------------------------------------------
def file_fields(
    cls: type,
    data: dict[str, Any],
    source: Any,
    ignored: set[str],
    *,
    adapter: str = "adapter",
    unsupported: str = "a PEFT feature peftkit does not support",
) -> dict[str, Any]:
    """The keys of `data` that config class `cls` has. Any other key set to a value is refused unless
    it is in `ignored` (keys that mean nothing for trained weights): loading an adapter without what
    such a key asks for would give another model than the one trained."""
    known = {f.name for f in fields(cls)}
    ours: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            ours[key] = value
        elif key not in ignored and value not in (None, False, {}, [], ""):
            raise AdapterFileError(
                f"{source}: the {adapter} uses {key}={value!r}, {unsupported}; "
                "load it with HF PEFT, or re-train without that option"
            )
    return ours


def config_from_fields(cls: type, data: dict[str, Any], source: Any) -> Any:
    """`cls.from_dict(data)`, with a bad value reported as the file's (an AdapterFileError naming `source`)."""
    try:
        return cls.from_dict(data)  # type: ignore[attr-defined]
    except ConfigError as e:
        raise AdapterFileError(f"{source}: {e}") from None


# -- the protocol methods, written once ----------------------------------------------------------------
C = TypeVar("C", bound=type)


def method_config(label: str) -> Callable[[C], C]:
    """Class decorator for a method's frozen config dataclass (put it above `@dataclass`): adds the
    `MethodConfig` methods to_dict, from_dict, replace, field_docs and defaults, except those the class
    defines itself (the bottleneck config's `replace` re-derives its defaults). `label` names the
    method in messages: "unknown LoRA config key 'rank' (did you mean 'r'?)".

    A decorator, not a base class: configs share these methods, not an ancestor (STYLE.md, point 3)."""

    def from_dict(cls: type, data: dict[str, Any]) -> Any:
        """Build from a dict, rejecting unknown keys by name."""
        return from_mapping(cls, data, label)

    protocol = {
        "to_dict": _to_dict,
        "from_dict": classmethod(from_dict),
        "replace": _replace,
        "field_docs": classmethod(field_docs_of),
        "defaults": classmethod(defaults_of),
    }

    def decorate(cls: C) -> C:
        for name, method in protocol.items():
            if name not in cls.__dict__:
                setattr(cls, name, method)
        return cls

    return decorate


def _to_dict(self: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of the fields (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _replace(self: Any, **changes: Any) -> Any:
    """A copy with some fields changed (validated again)."""
    return self.from_dict({**self.to_dict(), **changes})
