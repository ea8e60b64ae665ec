"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP on a layer's output.

    y = base(x)
    out = y + scaling · up(act(down(dropout(y))))              down: out → m, up: m → out

Wrapping a block's last attention projection (o_proj) and its last feed-forward projection (down_proj)
puts an adapter "after attention" and "after the FFN" in the residual stream, before the block adds
its residual: Houlsby's placement is both, Pfeiffer's the FFN one only (`BottleneckConfig.config`).

Several active adapters apply in sequence, in the order `set_adapter` names them: the second adapter
reads the first one's output (out = y₁ + f₂(y₁) with y₁ = y + f₁(y)), as stacked adapters do in
the adapters library. A mixed batch routes each row through its own adapter or none. The adapter is
non-linear in y, so it cannot fold into the base weight: `supports_merge` is False.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit.methods.layer_machinery as layers

from ..core.layer_types import layer_type, weight_device, weight_shape
from ..core.rows import AdapterState, RowRouting
from ..errors import AdapterStateError
from .bottleneck_config import BottleneckConfig, config_from_file, config_to_file
from .spec import MethodSpec

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # the exact (erf) GELU
    "silu": F.silu,
    "tanh": torch.tanh,
}
ROLES = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
WRAPPABLE = "nn.Linear (also a 4-bit base), transformers Conv1D (GPT-2)"


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyper-parameters on one layer."""

    size: int  # the bottleneck width m
    non_linearity: str
    dropout: float
    scaling: float


def kind_of(module: nn.Module) -> str | None:
    """ "linear" (nn.Linear or a 4-bit linear) or "conv1d_gpt2"; None for what cannot take an adapter."""
    kind = layer_type(module)
    return kind if kind in ("linear", "conv1d_gpt2") else None


def out_features(base: nn.Module, kind: str) -> int:
    """The width of the layer's output: nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    shape = weight_shape(base)
    return shape[1] if kind == "conv1d_gpt2" else shape[0]


class BottleneckLayer(nn.Module):
    """A base layer plus named bottleneck adapters on its output. Parameters per adapter:
    `adapter_down[name]` (Linear out → m) and `adapter_up[name]` (Linear m → out), with biases."""

    is_adapter_wrapper = True

    specs: dict[str, AdapterSpec]
    kind: str

    def __init__(self, base_layer: nn.Module, kind: str, state: AdapterState) -> None:
        super().__init__()
        layers.setup(self, base_layer, kind, state)  # `merged` stays empty: a bottleneck never merges
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: BottleneckConfig, module_name: str, *, dtype: torch.dtype | None = None
    ) -> None:
        """Create adapter `name` on this layer; with `config.init_weights` the up-projection (weight
        and bias) is zero, so the layer's output is unchanged until training moves it."""
        width = out_features(self.base_layer, self.kind)
        size = config.size_for(width)
        dtype, device = layers.adapter_dtype(self.base_layer, dtype), weight_device(self.base_layer)
        down = nn.Linear(width, size, device=device, dtype=dtype)  # Kaiming-uniform, as nn.Linear
        up = nn.Linear(size, width, device=device, dtype=dtype)
        if config.init_weights:
            with torch.no_grad():
                down.bias.zero_()
                up.weight.zero_()
                up.bias.zero_()
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        layers.added(
            self, name, AdapterSpec(size, config.non_linearity, config.adapter_dropout, config.scaling)
        )

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from this layer."""
        layers.delete(self, name, (self.adapter_down, self.adapter_up))

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """This layer's parameters of adapter `name`, by role (the roles are the file key suffixes)."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        return dict(zip(ROLES, (down.weight, down.bias, up.weight, up.bias)))

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if layers.bypassed(self):
            return result
        if self.state.rows is not None:
            return self._forward_mixed(result, self.state.rows)
        for name in layers.unmerged_active(self):  # in sequence: each reads the previous one's output
            result = self._apply(name, result)
        return result

    def _apply(self, name: str, y: Tensor) -> Tensor:
        """y + s·up(act(down(dropout(y)))), computed in the adapter's dtype, returned in y's."""
        spec, down, up = self.specs[name], self.adapter_down[name], self.adapter_up[name]
        h = y.to(down.weight.dtype)
        if self.training and spec.dropout > 0:
            h = F.dropout(h, spec.dropout, training=True)
        h = ACTIVATIONS[spec.non_linearity](F.linear(h, down.weight, down.bias))  # (..., m)
        delta = F.linear(h, up.weight, up.bias)  # (..., out)
        return y + (delta * spec.scaling).to(y.dtype)

    def _forward_mixed(self, y: Tensor, routing: RowRouting) -> Tensor:
        """Each row through its own adapter (or none): one gathered bmm per projection."""
        slots, same = layers.row_dispatch(self, routing, y)  # (N,) slot per row
        if same is not None:  # every row the same: the plain path
            return self._apply(same[0], y) if same else y
        dw, db, uw, ub, dropouts, act_ids, act_names = self._stacks()
        n = y.shape[0]
        y3 = y.reshape(n, -1, y.shape[-1]).to(dw.dtype)  # (N, L, out)
        if self.training and bool((dropouts > 0).any()):
            p = dropouts.index_select(0, slots).view(n, 1, 1)  # (N, 1, 1) each row's adapter's rate
            y3 = y3 * (torch.rand_like(y3) >= p).to(y3.dtype) / (1 - p)
        h = torch.baddbmm(db.index_select(0, slots).unsqueeze(1), y3, dw.index_select(0, slots))  # (N, L, m)
        h = _activate(h, act_ids.index_select(0, slots), act_names)
        # The base slot's zero weights and biases give an exact zero, so its rows pass unchanged.
        delta = torch.baddbmm(
            ub.index_select(0, slots).unsqueeze(1), h, uw.index_select(0, slots)
        )  # (N, L, out)
        return y + delta.view(y.shape).to(y.dtype)

    def _stacks(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[str]]:
        """Every adapter's projections stacked, plus an all-zero slot for rows without an adapter:
        down^T (n+1, out, m_max), its bias (n+1, m_max), s·up^T (n+1, m_max, out), s·bias (n+1, out),
        dropout rates (n+1,), each slot's activation index (n+1,) and the activations' names.

        Narrower adapters are zero-padded to m_max: the padded units are act(0) = 0 for every
        activation offered, and their up columns are zero. Cached by `layers.stacked`.
        """
        return layers.stacked(self, self._build_stacks)

    def _build_stacks(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[str]]:
        names = list(self.specs)
        m = max(s.size for s in self.specs.values())
        dtype = self.adapter_down[names[0]].weight.dtype
        down = [self.adapter_down[n] for n in names]
        up = [(self.adapter_up[n], self.specs[n].scaling) for n in names]
        dw = torch.stack([F.pad(d.weight.to(dtype), (0, 0, 0, m - d.out_features)).t() for d in down])
        db = torch.stack([F.pad(d.bias.to(dtype), (0, m - d.out_features)) for d in down])
        uw = torch.stack([F.pad(u.weight.to(dtype), (0, m - u.in_features)).t() * s for u, s in up])
        ub = torch.stack([u.bias.to(dtype) * s for u, s in up])
        dw, db, uw, ub = (torch.cat([t, torch.zeros_like(t[:1])]).contiguous() for t in (dw, db, uw, ub))
        act_names = list(dict.fromkeys(self.specs[n].non_linearity for n in names))
        ids = [act_names.index(self.specs[n].non_linearity) for n in names] + [0]  # base slot: any
        act_ids = torch.tensor(ids, device=dw.device)
        dropouts = torch.tensor([self.specs[n].dropout for n in names] + [0.0], device=dw.device)
        return dw, db, uw, ub, dropouts, act_ids, act_names

    # -- merging: not possible ----------------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        """Refused: the adapter is a non-linear function of the layer's output, not a weight change."""
        mine = [n for n in names if n in self.specs]
        if mine:
            raise AdapterStateError(
                f"bottleneck adapters {mine} cannot be merged into the base weight (they apply a "
                "non-linear function to the layer's output); keep them unmerged"
            )

    def unmerge(self) -> None:
        """Nothing to restore: a bottleneck adapter never merges."""

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(m={s.size}, {s.non_linearity})" for n, s in self.specs.items())
        return f"kind={self.kind}, adapters=[{adapters}]"


def _activate(h: Tensor, row_acts: Tensor, act_names: list[str]) -> Tensor:
    """Each row's own activation over h (N, L, m); one call when all adapters share one."""
    if len(act_names) == 1:
        return ACTIVATIONS[act_names[0]](h)
    out = torch.zeros_like(h)
    for i, name in enumerate(act_names):
        out = torch.where((row_acts == i).view(-1, 1, 1), ACTIVATIONS[name](h), out)
    return out


# -- what the shared code needs to know about bottleneck adapters (its MethodSpec entry) ----------------
def expected_shapes(
    base: nn.Module, kind: str, config: BottleneckConfig, module_name: str
) -> dict[str, tuple[int, ...]]:
    """The parameter shapes an adapter with `config` has on `base`, by role."""
    width = out_features(base, kind)
    m = config.size_for(width)
    return dict(zip(ROLES, ((m, width), (m,), (width, m), (width,))))


def wrap(module: nn.Module, kind: str, state: AdapterState) -> BottleneckLayer:
    return BottleneckLayer(module, kind, state)


def check_new_targets(config: BottleneckConfig, targets: list) -> None:
    """Warn when an adapter is wider than the layer output it reads: then it is no bottleneck, and
    costs more parameters than a full update of that output would."""
    over = [
        (t, config.size_for(w), w)
        for t in targets
        if config.size_for(w := out_features(t.module, t.kind)) > w
    ]
    if not over:
        return
    t, m, width = over[0]
    more = f" (and {len(over) - 1} more layers)" if len(over) > 1 else ""
    warnings.warn(
        f"bottleneck size {m} is wider than the output of {t.name!r} ({width} features){more}, so the "
        f"adapter is no bottleneck; use bottleneck_size < {width}, or a reduction_factor (e.g. 16)",
        stacklevel=4,
    )


_DOWN = ".adapter_down.weight"


def file_layers(keys: list[str]) -> list[str]:
    """The module paths that carry bottleneck adapters, from a file's layer keys (prefix removed)."""
    return sorted(k.removesuffix(_DOWN) for k in keys if k.endswith(_DOWN))


def describe_method(config: BottleneckConfig) -> str:
    return f"Bottleneck adapter ({config.config.capitalize()})"


def describe(config: BottleneckConfig, tensors: dict[str, Tensor], modules: list[str]) -> dict[str, Any]:
    """The adapter's facts for `peftkit info`; the widths are read from the tensors."""
    sizes = Counter(int(tensors[f"base_model.model.{m}{_DOWN}"].shape[0]) for m in modules)
    return {
        "bottleneck_sizes": sorted(sizes),
        "non_linearity": config.non_linearity,
        "scaling": config.scaling,
        "reduction_factor": config.reduction_factor,
    }


def info_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """The bottleneck lines of `peftkit info`'s text report."""
    sizes = ", ".join(map(str, f["bottleneck_sizes"])) or "none"
    rule = f" (layer width // {f['reduction_factor']:g})" if f["reduction_factor"] else ""
    return [("bottleneck", f"{sizes}{rule}, {f['non_linearity']}, scaling {f['scaling']:g}")]


SPEC = MethodSpec(
    name="bottleneck",
    label="Bottleneck adapter",
    description="a small residual MLP y + s·up(act(down(y))) on a layer's output (Houlsby, Pfeiffer); "
    "non-linear, so it never merges",
    config_cls=BottleneckConfig,
    peft_type="BOTTLENECK",
    supports_merge=False,
    supports_mixed_batch=True,
    variants={"houlsby": {"config": "houlsby"}, "pfeiffer": {"config": "pfeiffer"}},
    layer_cls=BottleneckLayer,
    kind_of=kind_of,
    wrap=wrap,
    wrappable=WRAPPABLE,
    expected_shapes=expected_shapes,
    check_new_targets=check_new_targets,
    config_to_file=lambda config, layers: config_to_file(config, [n for n, _ in layers]),
    config_from_file=config_from_file,
    file_layers=file_layers,
    describe_method=describe_method,
    describe=describe,
    info_rows=info_rows,
)
