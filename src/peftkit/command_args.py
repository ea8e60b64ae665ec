"""How a command function marks its parameters for the CLI generator (`peftkit.cli`), without importing
the CLI: command modules sit below it and import these markers from here.

    def train(config: Annotated[Path | None, Positional()] = None,
              overrides: Annotated[dict, ConfigOptions(field_help, field_defaults)] | None = None): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal


class Positional:
    """Marks a parameter that has a default as an optional positional argument (`CONFIG` in
    `peftkit train [CONFIG]`): `config: Annotated[Path | None, Positional()] = None`. On a list, any
    number of them, and a keyword-only parameter after it is the positional that follows
    (`BASE [ADAPTER ...] OUT`)."""


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


class Help:
    """A parameter's `--help` text, for a parameter that means the same in every command that takes it:
    the type carries it, so the commands' docstrings need not repeat it (one given there wins)."""

    def __init__(self, text: str) -> None:
        self.text = text


# Parameters the commands that open a base model with adapters share, with their one help text.
Base = Annotated[str, Help("the base model: a built-in name, an HF model directory or a .gguf file")]
Dtype = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    Help(
        "the dtype to load the base in and compute in (auto: bf16 where this machine computes it "
        "natively, else float32)"
    ),
]
Quantize = Annotated[
    Literal["nf4"] | None, Help("nf4: load the base with 4-bit NF4 linear layers (as QLoRA trained on it)")
]
AdapterRegistry = Annotated[
    str | None,
    Help(
        "the adapter registry that NAME@N references come from (default: $PEFTKIT_REGISTRY, else "
        "~/.peftkit/registry; a directory or a postgresql:// URL)"
    ),
]
