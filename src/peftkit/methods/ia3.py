"""IA³: a layer that holds a base layer and any number of named scaling vectors.

    y = base(x) ⊙ Π_active l          (output-scaled targets: the bias is scaled too)
    y = base(x ⊙ Π_active l)          (feedforward targets: the input is scaled)

Several active adapters multiply, as in HF PEFT. The vectors are stored in PEFT's shapes ((out, 1) or
(1, in) for linear layers, (1, C, 1, ...) for convolutions), so files convert by renaming only.
The base layer is read only through its forward and `dense_weight`, so it may be 4-bit.
Nothing here merges or unmerges as a side effect of `forward`, `train` or `eval`.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import peftkit.methods.ia3_config as ia3_config
import peftkit.methods.layer_machinery as layers

from ..core.layer_types import layer_type, weight_device, weight_shape
from ..core.rows import AdapterState, RowRouting
from ..errors import RequestError
from .ia3_config import KEY_SUFFIX, IA3Config
from .spec import MethodSpec

INIT_NOISE = 0.2  # init_ia3_weights=False: vectors ~ N(1, 0.2²), a clear change that keeps the model sane


@dataclass(frozen=True)
class IA3Kind:
    """How IA³ applies to one layer type: where channels sit and how a vector scales the weight."""

    name: str
    transposed: bool = False  # GPT-2's Conv1D stores its weight (in, out)
    nd: int = 0  # spatial dims of a convolution (0: a linear layer)

    @property
    def channel_dim(self) -> int:
        return 1 if self.nd else -1

    def dims(self, base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features): the widths of an input- and an output-scaling vector."""
        if self.nd:
            return base.in_channels, base.out_channels
        rows, cols = weight_shape(base)
        return (rows, cols) if self.transposed else (cols, rows)

    def vector_shape(self, base: nn.Module, feedforward: bool) -> tuple[int, ...]:
        """HF PEFT's shape of the vector: (1, in) / (out, 1) for linears, (1, C, 1, ...) for convs."""
        fan_in, fan_out = self.dims(base)
        if self.nd:
            return (1, fan_in if feedforward else fan_out, *([1] * self.nd))
        return (1, fan_in) if feedforward else (fan_out, 1)

    def on_activations(self, v: Tensor, ndim: int) -> Tensor:
        """A flat vector (C,) shaped to broadcast over an activation of `ndim` dims."""
        return v.view(-1, *([1] * (ndim - 2))) if self.nd else v

    def on_rows(self, v: Tensor, ndim: int) -> Tensor:
        """Per-row vectors (N, C) shaped to broadcast over an activation (N, ..., C) or (N, C, ...)."""
        ones = [1] * (ndim - 2)
        return v.view(v.shape[0], -1, *ones) if self.nd else v.view(v.shape[0], *ones, -1)

    def on_weight(self, base: nn.Module, v: Tensor, feedforward: bool) -> Tensor:
        """A flat vector (C,) shaped to scale the base weight's input columns or output rows."""
        if not self.nd:
            along_rows = feedforward == self.transposed  # rows are outputs (nn.Linear) or inputs (Conv1D)
            return v.view(-1, 1) if along_rows else v.view(1, -1)
        k = [1] * self.nd
        if not feedforward:
            return v.view(-1, 1, *k)  # weight (out, in/groups, *k)
        if base.groups == 1:
            return v.view(1, -1, *k)
        groups, per_group = base.groups, base.in_channels // base.groups
        # Input channel g·per_group + j of a grouped conv is column j of group g's output rows.
        v = v.view(groups, 1, per_group).expand(groups, base.out_channels // groups, per_group)
        return v.reshape(base.out_channels, per_group, *k)


_KINDS = {
    "linear": IA3Kind("linear"),
    "conv1d_gpt2": IA3Kind("conv1d_gpt2", transposed=True),
    "conv2d": IA3Kind("conv2d", nd=2),
    "conv3d": IA3Kind("conv3d", nd=3),
}
SUPPORTED_TYPES = "nn.Linear (a 4-bit one too), transformers Conv1D (GPT-2), nn.Conv2d, nn.Conv3d"


def kind_of(module: nn.Module) -> IA3Kind | None:
    """The IA³ kind for a module, or None if IA³ cannot scale it (HF PEFT's IA³ has no nn.Conv1d or
    nn.Embedding, so neither has one here: their files would not load there)."""
    return _KINDS.get(layer_type(module) or "")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's setting on one layer."""

    feedforward: bool  # scales the layer's input (else its output)


class IA3Layer(nn.Module):
    """A base layer plus named IA³ vectors `ia3_l[name]`, in the shapes HF PEFT stores them."""

    is_adapter_wrapper = True

    specs: dict[str, AdapterSpec]
    kind: IA3Kind

    def __init__(self, base_layer: nn.Module, kind: IA3Kind, state: AdapterState) -> None:
        super().__init__()
        layers.setup(self, base_layer, kind, state)
        self.ia3_l = nn.ParameterDict()
        # An output-scaling merge scales the bias too: its exact pre-merge value, for unmerge.
        self.register_buffer("unmerged_bias", None, persistent=False)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: IA3Config, module_name: str, *, dtype: torch.dtype | None = None
    ) -> None:
        """Create adapter `name` on this layer: ones, or (init_ia3_weights=False) random around 1."""
        feedforward = config.is_feedforward(module_name)
        dtype = layers.adapter_dtype(self.base_layer, dtype)
        shape = self.kind.vector_shape(self.base_layer, feedforward)
        vector = torch.ones(shape)
        if not config.init_ia3_weights:
            vector += INIT_NOISE * torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(vector.to(weight_device(self.base_layer), dtype))
        layers.added(self, name, AdapterSpec(feedforward))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from this layer (it must not be merged)."""
        layers.delete(self, name, (self.ia3_l,))

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """This layer's parameters of adapter `name`, by role: ia3_l."""
        return {KEY_SUFFIX: self.ia3_l[name]}

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if layers.bypassed(self):
            return self.base_layer(x, *args, **kwargs)
        if self.state.rows is not None:
            return self._forward_mixed(x, self.state.rows, args, kwargs)
        return self._scaled(x, layers.unmerged_active(self), args, kwargs)

    def _scaled(self, x: Tensor, names: list[str], args: tuple, kwargs: dict) -> Tensor:
        """The base layer with adapters `names` applied (their vectors multiplied, as HF PEFT does)."""
        on_input = [self.ia3_l[n].flatten() for n in names if self.specs[n].feedforward]
        on_output = [self.ia3_l[n].flatten() for n in names if not self.specs[n].feedforward]
        if on_input:
            scale = functools.reduce(operator.mul, on_input)  # (in,)
            x = (x.to(scale.dtype) * self.kind.on_activations(scale, x.dim())).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if on_output:
            scale = functools.reduce(operator.mul, on_output)  # (out,)
            result = (result * self.kind.on_activations(scale, result.dim())).to(result.dtype)
        return result

    def _forward_mixed(self, x: Tensor, routing: RowRouting, args: tuple, kwargs: dict) -> Tensor:
        rows, same = layers.row_dispatch(self, routing, x)  # (N,) slot per row
        if same is not None:  # one adapter (or none) for the whole batch: the plain path
            return self._scaled(x, same, args, kwargs)
        on_input, on_output = self._stacks()  # (n + 1, in) / (n + 1, out), or None; ones for other rows
        if on_input is not None:
            scale = self.kind.on_rows(on_input.index_select(0, rows), x.dim())  # (N, .., in) / (N, in, ..)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if on_output is not None:
            scale = self.kind.on_rows(on_output.index_select(0, rows), result.dim())
            result = (result * scale).to(result.dtype)
        return result

    # -- per-row routing and stacked vectors ---------------------------------------------------------
    def _stacks(self) -> tuple[Tensor | None, Tensor | None]:
        """Every adapter's vector as a row of an input stack (feedforward adapters) and an output stack
        (the others), ones where an adapter does not scale that side, plus a ones row for base rows:
        (n + 1, in) and (n + 1, out), None for a side no adapter scales. Cached by `layers.stacked`.
        """
        return layers.stacked(self, self._build_stacks)

    def _build_stacks(self) -> tuple[Tensor | None, Tensor | None]:
        params = list(self.ia3_l.values())
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        fan_in, fan_out = self.kind.dims(self.base_layer)
        stacks = []
        for feedforward, width in ((True, fan_in), (False, fan_out)):
            if not any(s.feedforward == feedforward for s in self.specs.values()):
                stacks.append(None)
                continue
            ones = torch.ones(width, dtype=dtype, device=params[0].device)
            vectors = [
                self.ia3_l[n].flatten().to(dtype) if s.feedforward == feedforward else ones
                for n, s in self.specs.items()
            ]
            stacks.append(torch.stack([*vectors, ones]))  # (n + 1, width)
        return stacks[0], stacks[1]

    # -- merging ------------------------------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight (and, for output scaling, the bias). Idempotent; the
        pre-merge weight and bias are kept for unmerge."""
        todo = layers.to_merge(self, names)
        if not todo:
            return
        base = self.base_layer
        compute = torch.promote_types(self.unmerged_weight.dtype, torch.float32)
        weight = self.unmerged_weight.to(compute)
        bias = self.unmerged_bias.to(compute) if self.unmerged_bias is not None else None
        for n in self.merged + todo:  # recomputed from the original weight, so merging twice changes nothing
            v, feedforward = self.ia3_l[n].detach().to(compute).flatten(), self.specs[n].feedforward
            weight = weight * self.kind.on_weight(base, v, feedforward)
            if bias is not None and not feedforward:
                bias = bias * v
        with torch.no_grad():
            base.weight.copy_(weight.to(base.weight.dtype))
            if bias is not None:
                base.bias.copy_(bias.to(base.bias.dtype))
        layers.merged(self, todo)

    def unmerge(self) -> None:
        """Restore the exact pre-merge weight and bias."""
        layers.unmerge(self)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}({'input' if s.feedforward else 'output'})" for n, s in self.specs.items())
        return f"kind={self.kind.name}, adapters=[{adapters}], merged={self.merged}"


# -- what the shared code needs to know about IA³ (its MethodSpec entry) --------------------------------
def expected_shapes(
    base: nn.Module, kind: IA3Kind, config: IA3Config, module_name: str
) -> dict[str, tuple[int, ...]]:
    """The vector's shape an adapter with `config` has on `base`, by role."""
    return {KEY_SUFFIX: kind.vector_shape(base, config.is_feedforward(module_name))}


def slot_tensors(layer: IA3Layer, name: str) -> dict[str, Tensor]:
    """One adapter of a linear layer as the serving engine's slot tensors: the vector as in_scale
    (feedforward targets) or as out_scale and bias_scale (PEFT scales the whole output, bias too)."""
    if layer.kind.nd or layer.kind.transposed:
        raise RequestError(f"the server serves IA³ on nn.Linear layers, not {layer.kind.name}")
    vector = layer.ia3_l[name].detach().reshape(-1)
    if layer.specs[name].feedforward:
        return {"in_scale": vector}
    return {"out_scale": vector, "bias_scale": vector}


def wrap(module: nn.Module, kind: IA3Kind, state: AdapterState) -> IA3Layer:
    return IA3Layer(module, kind, state)


SPEC = MethodSpec(
    name="ia3",
    label="IA³",
    description="a learned vector rescales each target's output (or, for feedforward targets, its input)",
    config_cls=IA3Config,
    peft_type="IA3",
    supports_merge=True,
    supports_mixed_batch=True,
    variants={"ia3": {}},
    layer_cls=IA3Layer,
    kind_of=kind_of,
    wrap=wrap,
    wrappable=SUPPORTED_TYPES,
    expected_shapes=expected_shapes,
    check_new_targets=ia3_config.check_new_targets,
    key_suffix=lambda role, kind: KEY_SUFFIX,
    config_to_file=lambda config, layers: ia3_config.config_to_file(
        config, [n for n, _ in layers], [m.kind.name for _, m in layers]
    ),
    config_from_file=ia3_config.config_from_file,
    file_layers=ia3_config.file_layers,
    describe=ia3_config.describe,
    info_rows=ia3_config.info_rows,
    # The vectors start at 1 and mean "keep the activation as it is"; weight decay would pull them to 0,
    # switching the layers off, so they are never decayed.
    no_decay_roles=(KEY_SUFFIX,),
    slot_tensors=slot_tensors,
    slot_roles=frozenset({"in_scale", "out_scale", "bias_scale"}),
)
