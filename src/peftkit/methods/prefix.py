"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): the
keys and values of P virtual tokens, learned directly in every attention layer; the base model is
untouched. `peftkit.core.kv_prefix` feeds them to the model as the start of its key/value cache.

The table is HF PEFT's: one row per virtual token, [layer 0 keys | layer 0 values | layer 1 keys | ...],
each (H_kv, D) heads-major, so row width = num_layers * 2 * token_dim with token_dim = H_kv * D (PEFT's
grouped-query rule). With `prefix_projection` the table is computed by an MLP from P smaller
embeddings while training, and the file holds the computed table only (as PEFT saves it): a loaded
adapter holds the table itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import peftkit.methods.virtual_tokens as virtual_tokens

from ..core.kv_prefix import KV, Geometry, model_geometry
from ..errors import ConfigError, ShapeMismatchError
from .config_fields import check, config_field, is_int, method_config
from .spec import MethodSpec
from .virtual_tokens import GEOMETRY, check_common, check_geometry, geometry_field

ROLE = "prompt_embeddings"  # HF PEFT's (bare) file key for the prefix table


@method_config("prefix tuning")
@dataclass(frozen=True)
class PrefixTuningConfig:
    """Prefix tuning: P learned key/value vectors per attention layer, attended to before the input.

    Frozen and checked on construction; the geometry fields stay null until a model fills them.
    """

    num_virtual_tokens: int = config_field(20, "virtual tokens per layer (the prefix's length P)")
    prefix_projection: bool = config_field(
        False,
        "compute the prefixes with an MLP (Linear, Tanh, Linear) from P smaller embeddings while "
        "training, which can train more stably; the file holds the computed prefixes only",
    )
    encoder_hidden_size: int | None = config_field(
        None, "with prefix_projection: the MLP's hidden size (null: token_dim)"
    )
    token_dim: int | None = geometry_field("key/value heads x head size")
    num_layers: int | None = geometry_field("its transformer layers")
    num_attention_heads: int | None = geometry_field("its key/value heads, as HF PEFT counts them")
    num_transformer_submodules: int | None = geometry_field("1 for a decoder")

    def __post_init__(self) -> None:
        check_common(self)
        check(
            isinstance(self.prefix_projection, bool),
            "prefix_projection",
            self.prefix_projection,
            "true or false",
        )
        size = self.encoder_hidden_size
        ok = size is None or (is_int(size) and size > 0)
        check(ok, "encoder_hidden_size", size, "a positive integer, or null (token_dim)")


def prefix_geometry(g: Geometry) -> dict[str, int]:
    """The geometry fields of a prefix-tuning file for a model: HF PEFT counts key/value heads."""
    return virtual_tokens.file_geometry(g.kv_heads * g.head_dim, g.layers, g.kv_heads)


class PrefixEncoder(nn.Module):
    """The prefix table (P, layers * 2 * token_dim), learned directly or computed by an MLP. Module and
    parameter names are HF PEFT's (embedding, transform), so PEFT's weights load as they are."""

    def __init__(
        self, geometry: Geometry, config: PrefixTuningConfig, dtype: torch.dtype, device: Any
    ) -> None:
        super().__init__()
        self.shape = (geometry.layers, geometry.kv_heads, geometry.head_dim)
        self.fields = prefix_geometry(geometry)  # the file's geometry fields
        p, width = config.num_virtual_tokens, geometry.layers * 2 * geometry.kv_heads * geometry.head_dim
        token_dim = self.fields["token_dim"]
        factory = {"dtype": dtype, "device": device}
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(p, token_dim, **factory)  # normal(0, 1), as in HF PEFT
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden, **factory), nn.Tanh(), nn.Linear(hidden, width, **factory)
            )
        else:
            self.embedding = nn.Embedding(p, width, **factory)

    def table(self) -> Tensor:
        """The prefix table (P, L * 2 * H_kv * D)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def adapter_tensors(self) -> dict[str, Tensor]:
        # With the MLP the table is computed: what the file holds, not a parameter (the parameters are
        # this module's own); detached, so marking it (not) trainable touches nothing.
        return {ROLE: self.table() if self.transform is None else self.table().detach()}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Take a saved table. Files hold no MLP, so a projected adapter holds the table from here on
        (as HF PEFT loads one), trainable if the embeddings it replaces were."""
        table = tensors[ROLE]
        if self.transform is not None:
            old = self.embedding.weight
            self.transform = None
            self.embedding = nn.Embedding(*table.shape, dtype=old.dtype, device=old.device)
            self.embedding.weight.requires_grad_(old.requires_grad)
        with torch.no_grad():
            self.embedding.weight.copy_(table)

    def prefix_kv(self, model: nn.Module) -> KV:
        layers, heads, head_dim = self.shape
        table = self.table().to(virtual_tokens.model_dtype(model))  # (P, L * 2 * H * D)
        kv = table.view(table.shape[0], 2 * layers, heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, P, D)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def make_adapter(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    """A new prefix for `model`, initialised at random (HF PEFT's init; prefixes have no no-op value)."""
    geometry = model_geometry(model)
    check_geometry(config, prefix_geometry(geometry), model, "prefix tuning", ConfigError)
    weight = virtual_tokens.input_embeddings(model).weight
    return PrefixEncoder(geometry, config, weight.dtype, weight.device)


def expected_shapes(model: nn.Module, config: PrefixTuningConfig) -> dict[str, tuple[int, ...]]:
    """The file's table shape for `model`, after checking the file's geometry against the model."""
    fields = prefix_geometry(model_geometry(model))
    check_geometry(config, fields, model, "prefix tuning", ShapeMismatchError)
    return {ROLE: (config.num_virtual_tokens, fields["num_layers"] * 2 * fields["token_dim"])}


def config_to_file(config: PrefixTuningConfig, adapter: PrefixEncoder | None = None) -> dict[str, Any]:
    """The prefix-tuning part of adapter_config.json, with the model's geometry when the adapter is
    given (HF PEFT fills geometry left null from the model it loads into)."""
    data = virtual_tokens.config_to_file(
        config, None if adapter is None else adapter.fields, {"init_weights": None}
    )
    if data["encoder_hidden_size"] is None and data["token_dim"] is not None:
        data["encoder_hidden_size"] = data["token_dim"]  # PEFT's default, written as PEFT writes it
    return data


def config_from_file(data: dict[str, Any], source: Any) -> PrefixTuningConfig:
    """A PrefixTuningConfig from an adapter_config.json (`init_weights` only chose starting values)."""
    return virtual_tokens.from_file(
        PrefixTuningConfig, data, source, "prefix tuning", {"init_weights", "modules_to_save"}, {}
    )


def describe(config: PrefixTuningConfig, tensors: dict[str, Tensor], modules: list[str]) -> dict[str, Any]:
    """Prefix tuning's facts: the prefix's length and row width from the table, the rest from the file."""
    shape = tuple(tensors[ROLE].shape) if ROLE in tensors else (config.num_virtual_tokens, None)
    return {
        "num_virtual_tokens": shape[0],
        "row_width": shape[1],
        "prefix_projection": config.prefix_projection,
        "encoder_hidden_size": config.encoder_hidden_size,
        **{key: getattr(config, key) for key in GEOMETRY},
    }


def info_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """Prefix tuning's lines of the text report."""
    rows = [("virtual tokens", f"{f['num_virtual_tokens']} per layer (table row width {f['row_width']})")]
    if f["prefix_projection"]:
        rows.append(("projection", "trained through an MLP; the file holds the computed prefixes"))
    return rows + virtual_tokens.geometry_rows(f, heads="key/value heads")


SPEC = MethodSpec(
    name="prefix",
    label="prefix tuning",
    description="P learned key/value vectors in every attention layer; nothing to merge into the weights",
    config_cls=PrefixTuningConfig,
    peft_type="PREFIX_TUNING",
    variants={"prefix": {}, "projection": {"prefix_projection": True, "num_virtual_tokens": 3}},
    make_model_adapter=make_adapter,
    model_expected_shapes=expected_shapes,
    config_to_file=config_to_file,
    config_from_file=config_from_file,
    describe=describe,
    info_rows=info_rows,
    **virtual_tokens.SPEC_FLAGS,
)
