"""The bottleneck adapter's configuration (Houlsby et al. 2019, Pfeiffer et al. 2020) and its file form.

HF PEFT has no bottleneck adapters, so the `adapter_config.json` format is peftkit's own (see
docs/formats.md): the fields below, `peft_type` "BOTTLENECK" and a `format_version`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import AdapterFileError, ConfigError
from ..values import number_from_text, short_repr
from .config_fields import check, config_field, config_from_fields, is_int, is_num, method_config
from .targets import embed_targets, target_field

CONFIGS = ("houlsby", "pfeiffer")
# Where each placement puts its adapters, by Llama-family layer names: o_proj ends the attention
# sub-layer and down_proj the feed-forward one, so wrapping their outputs puts an adapter "after
# attention" and "after the FFN" in the residual stream, before the block's residual add.
DEFAULT_TARGETS = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
_ALIASES = {"swish": "silu", "gelu_new": "gelu"}  # other libraries' names, for the error message
DEFAULT_BOTTLENECK = 64
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)  # the adapter_config.json format_version values this peftkit reads


@method_config("bottleneck")
@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapters: y + scaling · up(act(down(dropout(y)))) on each target layer's output y.

    Validated on construction and never mutated afterwards. Defaults that depend on other fields are
    resolved here, so the stored config holds the real values: `target_modules` None becomes the
    placement's layers (`DEFAULT_TARGETS`), and with neither `bottleneck_size` nor `reduction_factor`
    set, `bottleneck_size` becomes 64. `replace()` re-derives them when what they depend on changes.
    `targets`: the layers to adapt as one `Targets` value (what `peftkit.core.inject` reads).
    """

    config: str = config_field(
        "pfeiffer",
        "where adapters go: 'houlsby' (after the attention output and after the feed-forward output of "
        "each block) or 'pfeiffer' (after the feed-forward output only: half the adapters, about the "
        "same quality in Pfeiffer et al. 2020)",
    )
    target_modules: tuple[str, ...] | str | None = config_field(
        None,
        "layers whose output gets an adapter, matched like LoRA's (names or dotted suffixes, a regex, or "
        "'all-linear'); null: the placement's Llama-family layers (houlsby: o_proj and down_proj; "
        "pfeiffer: down_proj). Other architectures name theirs, e.g. GPT-2 ['attn.c_proj', 'mlp.c_proj']",
    )
    exclude_modules: tuple[str, ...] | str | None = target_field("exclude_modules")
    layers_to_transform: tuple[int, ...] | None = target_field("layers_to_transform")
    layers_pattern: tuple[str, ...] | None = target_field("layers_pattern")
    bottleneck_size: int | None = config_field(
        None, "the adapter's inner width (64 when neither this nor reduction_factor is set)"
    )
    reduction_factor: float | None = config_field(
        None, "instead of bottleneck_size: inner width = layer output width // reduction_factor (at least 1)"
    )
    non_linearity: str = config_field(
        "relu", f"activation between down and up: one of {', '.join(NON_LINEARITIES)}"
    )
    adapter_dropout: float = config_field(0.0, "dropout probability on the adapter's input while training")
    scaling: float = config_field(1.0, "the adapter's output is multiplied by this before it is added")
    init_weights: bool = config_field(
        True, "true: zero up-projection, so the model starts unchanged; false: random (for tests)"
    )
    modules_to_save: tuple[str, ...] | None = target_field("modules_to_save")

    def __post_init__(self) -> None:
        for name in ("reduction_factor", "adapter_dropout", "scaling"):
            object.__setattr__(self, name, number_from_text(getattr(self, name)))
        check(self.config in CONFIGS, "config", self.config, f"one of {CONFIGS}")
        if self.target_modules is None:
            object.__setattr__(self, "target_modules", DEFAULT_TARGETS[self.config])
        if self.bottleneck_size is None and self.reduction_factor is None:
            object.__setattr__(self, "bottleneck_size", DEFAULT_BOTTLENECK)
        self._validate()

    def _validate(self) -> None:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ConfigError(
                f"bottleneck_size ({short_repr(self.bottleneck_size)}) and reduction_factor "
                f"({short_repr(self.reduction_factor)}) are both set; set one of the two (the other null)"
            )
        size, factor = self.bottleneck_size, self.reduction_factor
        check(size is None or (is_int(size) and size > 0), "bottleneck_size", size, "a positive integer")
        check(
            factor is None or (is_num(factor) and factor > 0),
            "reduction_factor",
            factor,
            "a positive number",
        )
        act = self.non_linearity
        hint = (
            f" ({act!r} is called {_ALIASES[act]!r} here)" if isinstance(act, str) and act in _ALIASES else ""
        )
        check(act in NON_LINEARITIES, "non_linearity", act, f"one of {NON_LINEARITIES}{hint}")
        p = self.adapter_dropout
        check(is_num(p) and 0 <= p < 1, "adapter_dropout", p, "a number in [0, 1)")
        check(is_num(self.scaling) and self.scaling > 0, "scaling", self.scaling, "a positive number")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "true or false")
        embed_targets(self)  # target_modules ... modules_to_save, normalised, and `self.targets`

    # -- derived values -------------------------------------------------------------------------
    def size_for(self, width: int) -> int:
        """The inner width of the adapter on a layer whose output has `width` features."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(width // self.reduction_factor))

    # -- conversion (to_dict, from_dict, field_docs and defaults come from `method_config`) ---------
    def replace(self, **changes: Any) -> BottleneckConfig:
        """A copy with some fields changed (validated again). Derived defaults follow what they derive
        from: a new `config` brings its own default targets (unless the targets were chosen), and
        setting one of bottleneck_size / reduction_factor clears the other."""
        data = {**self.to_dict(), **changes}
        new_config = changes.get("config", self.config)
        if (
            "target_modules" not in changes
            and new_config != self.config
            and self.target_modules == DEFAULT_TARGETS[self.config]
        ):
            data["target_modules"] = None
        for key, other in (("bottleneck_size", "reduction_factor"), ("reduction_factor", "bottleneck_size")):
            if changes.get(key) is not None and other not in changes:
                data[other] = None
        return self.from_dict(data)


# -- the adapter_config.json of a bottleneck adapter ---------------------------------------------------
def config_to_file(config: BottleneckConfig, targets: list[str]) -> dict[str, Any]:
    """The bottleneck part of adapter_config.json: `format_version`, then every resolved field, with
    target_modules as the layers the adapter sits on (so the file says exactly where its tensors go)."""
    return {"format_version": FORMAT_VERSION, **config.to_dict(), "target_modules": sorted(targets)}


def config_from_file(data: dict[str, Any], source: Any) -> BottleneckConfig:
    """A BottleneckConfig from the method fields of an adapter_config.json (shared keys removed)."""
    data = dict(data)
    version = data.pop("format_version", None)
    readable = ", ".join(map(str, READABLE_VERSIONS))
    if version is None:
        raise AdapterFileError(
            f"{source}: a bottleneck adapter_config.json needs a format_version, and this one has none; "
            f"this peftkit reads format_version {readable} (docs/formats.md)"
        )
    if not is_int(version) or version not in READABLE_VERSIONS:
        newer = is_int(version) and version > max(READABLE_VERSIONS)
        fix = (
            "a newer peftkit wrote it: upgrade peftkit to load it"
            if newer
            else "no peftkit writes that version: the file is damaged or was written by another tool"
        )
        raise AdapterFileError(
            f"{source}: the bottleneck adapter has format_version {short_repr(version)}; this peftkit reads "
            f"format_version {readable} ({fix})"
        )
    return config_from_fields(BottleneckConfig, data, source)
