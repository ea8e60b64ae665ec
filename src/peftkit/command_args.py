"""How a command function marks its parameters for the CLI generator (`peftkit.cli`), without importing
the CLI: command modules sit below it and import these markers from here.

    def train(config: Annotated[Path | None, Positional()] = None,
              overrides: Annotated[dict, ConfigOptions(field_help, field_defaults)] | None = None): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
