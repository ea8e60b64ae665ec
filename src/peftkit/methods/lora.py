"""LoRA, rsLoRA and DoRA: a layer that holds a base layer and any number of named low-rank adapters.

    y = base(x) + Σ_active w·s·B·A·dropout(x)                     (LoRA; s = α/r, or α/√r for rsLoRA)
    y = base(x) + (m/‖W+sBA‖ − 1)·W·x + (m/‖W+sBA‖)·s·B·A·x        (DoRA; the norm is detached, per row)

Layer-type specifics live in `lora_kinds`; which adapters run, and with which inference weights w
(1 unless `set_adapter` or a mixed batch's row gives one; DoRA adapters always 1), is read from the
shared `AdapterState`.
Nothing here merges or unmerges as a side effect of `forward`, `train` or `eval`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit.methods.layer_machinery as layers
import peftkit.methods.lora_info as lora_info

from ..core.layer_types import is_quantized, weight_device
from ..core.rows import AdapterState, RowRouting, row_weights
from ..errors import RequestError
from .lora_config import LoraConfig, config_from_file, config_to_file, pattern_matches
from .lora_kinds import SUPPORTED_TYPES, LayerKind, kind_of, unsupported_reason
from .spec import MethodSpec


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyper-parameters on one layer (after per-module overrides)."""

    r: int
    alpha: float
    scaling: float
    dropout: float
    use_dora: bool


class LoraLayer(nn.Module):
    """A base layer plus named LoRA adapters. Parameters: `lora_A[name]`, `lora_B[name]`, and
    for DoRA adapters `lora_magnitude[name]`, in the same shapes HF PEFT stores them."""

    is_adapter_wrapper = True

    specs: dict[str, AdapterSpec]
    kind: LayerKind

    def __init__(self, base_layer: nn.Module, kind: LayerKind, state: AdapterState) -> None:
        super().__init__()
        layers.setup(self, base_layer, kind, state)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.merged_weights: dict[str, float] = {}  # the inference weight each merged adapter went in with

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: LoraConfig, module_name: str, *, dtype: torch.dtype | None = None
    ) -> None:
        """Create adapter `name` on this layer, initialised as `config.init_lora_weights` says."""
        r, alpha = config.rank_and_alpha(module_name)
        dropout = config.lora_dropout if self.kind.supports_dropout else 0.0
        spec = AdapterSpec(r, alpha, config.scaling(r, alpha), dropout, config.use_dora)
        dtype, device = layers.adapter_dtype(self.base_layer, dtype), weight_device(self.base_layer)
        a_shape, b_shape = self.kind.factor_shapes(self.base_layer, r)
        a = torch.empty(a_shape, device=device, dtype=dtype)
        b = torch.empty(b_shape, device=device, dtype=dtype)
        _init_factors(a, b, config.init_lora_weights, r, is_embedding=self.kind.name == "embedding")
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        layers.added(self, name, spec)
        if spec.use_dora:  # m starts at ‖W + s·B·A‖ per output feature, so the layer starts as W + s·B·A
            norm = self._weight_norm(name).to(dtype)
            self.lora_magnitude[name] = nn.Parameter(norm.reshape(self.kind.magnitude_shape(self.base_layer)))
            self._cache.clear()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from this layer (it must not be merged)."""
        layers.delete(self, name, (self.lora_A, self.lora_B, self.lora_magnitude))

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """This layer's parameters of adapter `name`, by role: lora_A, lora_B and (DoRA) lora_magnitude."""
        out = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        if name in self.lora_magnitude:
            out["lora_magnitude"] = self.lora_magnitude[name]
        return out

    def expected_shapes(self, config: LoraConfig, module_name: str) -> dict[str, tuple[int, ...]]:
        """The shapes `adapter_tensors` would have for an adapter with this config (nothing is created)."""
        return expected_shapes(self.base_layer, self.kind, config, module_name)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if layers.bypassed(self):
            return result
        if self.state.rows is not None:
            return self._forward_mixed(x, result, self.state.rows)
        base = result
        # DoRA's W·x term must come from the base output, so DoRA adapters go first (out of place);
        # the plain ones may then add in place.
        for name in sorted(layers.unmerged_active(self), key=lambda n: not self.specs[n].use_dora):
            result = self._add_adapter(x, result, name, base, self.state.weight(name))
        return result

    def _add_adapter(
        self, x: Tensor, result: Tensor, name: str, base: Tensor, weight: float | Tensor = 1.0
    ) -> Tensor:
        """result + w·s·B·A·x (DoRA: its term, at weight 1); w a number, or one per row (N,)."""
        spec, a, b = self.specs[name], self.lora_A[name], self.lora_B[name]
        xd = self._dropout(x, spec.dropout).to(a.dtype) if x.is_floating_point() else x
        h = self.kind.features(self.base_layer, xd, a)  # (..., r)
        if not spec.use_dora:
            if isinstance(weight, Tensor):  # each row's weight scales its rank features
                h = h * weight.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))  # (N, ..., r) or (N, r, ...)
                weight = 1.0
            return _add_low_rank(self.kind, self.base_layer, result, h, b, spec.scaling * weight)
        f = self._dora_factor(name)  # (out,) or (1, out, 1, ...) for convs
        delta = self.kind.project(self.base_layer, h, b) * spec.scaling
        y0 = self._base_no_bias(x, xd, base, dropped=self.training and spec.dropout > 0)
        return result + ((f - 1) * y0 + f * delta).to(result.dtype)

    def _forward_mixed(self, x: Tensor, result: Tensor, routing: RowRouting) -> Tensor:
        if routing.weights is not None:
            return self._forward_weighted(x, result, routing)
        rows, same = layers.row_dispatch(self, routing, x)  # (N,) slot per row
        if same is not None:  # one adapter (or none) for the whole batch: the plain path
            return self._add_adapter(x, result, same[0], result) if same else result
        sa, sb, dropouts, factors = self._stacks()
        xd, dropped = x, False
        if self.training and x.is_floating_point() and bool((dropouts > 0).any()):
            p = dropouts.index_select(0, rows).view(-1, *([1] * (x.dim() - 1)))
            xd, dropped = x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p), True
        if x.is_floating_point():
            xd = xd.to(sa.dtype)
        if (
            factors is None
            and not torch.is_grad_enabled()
            and sa.dtype == result.dtype
            and result.is_contiguous()
        ):
            return self.kind.mixed(self.base_layer, xd, sa, sb, rows, out=result)  # added in place
        delta = self.kind.mixed(self.base_layer, xd, sa, sb, rows)  # scaling is folded into sb
        if factors is None:
            return result + delta.to(result.dtype)
        f = factors.index_select(0, rows)  # (N, out)
        lead = [1] * (result.dim() - 2)  # the output's middle dims (an embedding adds one to its input's)
        f = f.view(f.shape[0], *lead, -1) if self.kind.channel_dim == -1 else f.view(*f.shape, *lead)
        y0 = self._base_no_bias(x, xd, result, dropped=dropped)
        return result + ((f - 1) * y0 + f * delta).to(result.dtype)

    def _forward_weighted(self, x: Tensor, result: Tensor, routing: RowRouting) -> Tensor:
        """A mixed batch with weighted rows: each adapter some row uses runs over the whole batch, its
        rank features scaled per row (w_row, 0 for rows without it). A DoRA adapter is never in a weighted
        set, so its weights are 0 or 1 and its term is masked per row."""
        weights, used = row_weights(routing, list(self.specs), x, self._cache)  # (N, n), slots in use
        names = list(self.specs)
        base = result
        for slot in sorted(used, key=lambda s: not self.specs[names[s]].use_dora):  # DoRA reads `base` first
            name, w = names[slot], weights[:, slot]  # (N,)
            if self.specs[name].use_dora:
                term = self._add_adapter(x, torch.zeros_like(base), name, base)
                result = result + term * w.to(term.dtype).view(-1, *([1] * (term.dim() - 1)))
            else:
                result = self._add_adapter(x, result, name, base, w)
        return result

    def _base_no_bias(self, x: Tensor, xd: Tensor, result: Tensor, dropped: bool) -> Tensor:
        """W·x without the bias; recomputed on the dropped-out input when dropout is active (as PEFT)."""
        if dropped:
            return self.kind.base_no_bias(self.base_layer, xd.to(result.dtype))
        bias = self.kind.bias_view(self.base_layer, result.dim())
        return result if bias is None else result - bias

    def _dropout(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    # -- per-row routing and stacked factors --------------------------------------------------------
    def _stacks(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """All adapters' factors stacked (plus a zero slot for base rows), scaling folded into B, in the
        layout the layer kind's `stack` gives; dropout rates (n+1,); and, with DoRA adapters, each slot's
        factor m/‖W+sBA‖ (n+1, out), ones for the others. Cached by `layers.stacked`, also keyed by the
        base weight (a DoRA factor reads it)."""
        return layers.stacked(self, self._build_stacks, self._base_version())

    def _build_stacks(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        names = list(self.specs)
        r_max = max(s.r for s in self.specs.values())
        a = [self.lora_A[n] for n in names] + [torch.zeros_like(self.lora_A[names[0]])]
        b = [self.lora_B[n] * self.specs[n].scaling for n in names] + [
            torch.zeros_like(self.lora_B[names[0]])
        ]
        sa, sb = self.kind.stack(a, b, r_max)
        dropouts = torch.tensor([self.specs[n].dropout for n in names] + [0.0], device=sa.device)
        factors = None
        if any(s.use_dora for s in self.specs.values()):
            ones = torch.ones(self.kind.dims(self.base_layer)[1], device=sa.device, dtype=sa.dtype)
            factors = torch.stack(
                [self._dora_factor(n).reshape(-1) if self.specs[n].use_dora else ones for n in names] + [ones]
            )
        return sa, sb, dropouts, factors

    def _base_version(self) -> tuple:
        """Changes whenever the base weight (or the pre-merge copy) does: a cache key."""
        if is_quantized(self.base_layer):
            return (id(self.base_layer),)  # a 4-bit weight is frozen: never changed in place
        w = self.unmerged_weight if self.unmerged_weight is not None else self.base_layer.weight
        return (w._version, w.data_ptr(), self.base_layer.weight._version)

    # -- DoRA ---------------------------------------------------------------------------------------
    def _weight_norm(self, name: str) -> Tensor:
        """‖W + s·B·A‖ per output feature, from the unmerged weight; detached, cached by version."""
        a, b = self.lora_A[name], self.lora_B[name]

        @torch.no_grad()  # a 4-bit base is dequantized here only when A or B changed
        def norm() -> Tensor:
            matrix = self.kind.weight_matrix(self.base_layer, self.unmerged_weight).float()  # (out, in_flat)
            return torch.linalg.vector_norm(matrix + self.delta_matrix(name), dim=1)  # (out,)

        return layers.cached(self, f"norm:{name}", (layers.versions([a, b]), self._base_version()), norm)

    def _dora_factor(self, name: str) -> Tensor:
        """m / ‖W + s·B·A‖, shaped like the magnitude so it broadcasts over the output channels."""
        m = self.lora_magnitude[name]
        return m / self._weight_norm(name).to(m.dtype).view(m.shape)

    # -- merging ------------------------------------------------------------------------------------
    def delta_matrix(self, name: str) -> Tensor:
        """s·B·A as an (out, in_flat) float32 matrix."""
        a, b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        return (b.detach().float().reshape(b.shape[0], spec.r) @ a.detach().float().reshape(spec.r, -1)) * (
            spec.scaling
        )

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, each with its inference weight (the one it is active with,
        else 1). Idempotent; the pre-merge weight is kept for unmerge."""
        todo = layers.to_merge(self, names)
        if not todo:
            return
        weight = self.base_layer.weight
        self.merged_weights |= {n: self.state.weight(n) for n in todo}
        w0 = self.kind.weight_matrix(self.base_layer, self.unmerged_weight).float()  # (out, in_flat)
        new = w0.clone()
        for n in self.merged + todo:  # recomputed from the original weight: the merge order does not matter
            delta = self.delta_matrix(n)
            if self.specs[n].use_dora:
                f = self.lora_magnitude[n].detach().float().reshape(-1) / self._weight_norm(n).float()
                new += (f - 1)[:, None] * w0 + f[:, None] * delta
            else:
                new += delta * self.merged_weights[n]
        with torch.no_grad():
            weight.copy_(self.kind.to_native(self.base_layer, new).to(weight.dtype))
        layers.merged(self, todo)

    def unmerge(self) -> None:
        """Restore the exact pre-merge weight."""
        layers.unmerge(self)
        self.merged_weights = {}

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}{', dora' if s.use_dora else ''})" for n, s in self.specs.items())
        return f"kind={self.kind.name}, adapters=[{adapters}], merged={self.merged}"


def expected_shapes(
    base: nn.Module, kind: LayerKind, config: LoraConfig, module_name: str
) -> dict[str, tuple[int, ...]]:
    """The parameter shapes an adapter with `config` has on `base`, by role."""
    r, _ = config.rank_and_alpha(module_name)
    a_shape, b_shape = kind.factor_shapes(base, r)
    out = {"lora_A": a_shape, "lora_B": b_shape}
    if config.use_dora:
        out["lora_magnitude"] = kind.magnitude_shape(base)
    return out


def _add_low_rank(
    kind: LayerKind, base: nn.Module, result: Tensor, h: Tensor, b: Tensor, scaling: float
) -> Tensor:
    """result + s·B(h), as one fused addmm where the layout allows it (in place when no grad is recorded)."""
    if kind.channel_dim == -1 and h.dtype == result.dtype and result.is_contiguous():
        out2d = result.view(-1, result.shape[-1])
        h2d = h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(out2d, h2d, b.t(), alpha=scaling).view(result.shape)
        out2d.addmm_(h2d, b.t(), alpha=scaling)
        return result
    return result + (kind.project(base, h, b) * scaling).to(result.dtype)


def _init_factors(a: Tensor, b: Tensor, init: bool | str, r: int, *, is_embedding: bool) -> None:
    with torch.no_grad():
        if init is False:  # both random: the adapter changes the output from the start
            if is_embedding:
                nn.init.normal_(a)
                nn.init.normal_(b)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        elif is_embedding:  # as loralib and PEFT: zero A, normal B
            nn.init.zeros_(a)
            nn.init.normal_(b)
        else:
            if init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)


# -- what the shared code needs to know about LoRA (its MethodSpec entry) ------------------------------
_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_EMBEDDING_SUFFIX = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}


def key_suffix(role: str, kind: LayerKind) -> str:
    """The file key suffix of a LoRA tensor, as HF PEFT names it (`lora_embedding_A` on embeddings)."""
    embedding = kind.name == "embedding" and role in _EMBEDDING_SUFFIX
    return _EMBEDDING_SUFFIX[role] if embedding else _SUFFIX[role]


def slot_tensors(layer: LoraLayer, name: str) -> dict[str, Tensor]:
    """One adapter of a linear layer as the serving engine's slot tensors: A (r, in), B·scaling
    (out, r), and for DoRA its per-output factor m/‖W + s·B·A‖ as out_scale (the bias stays unscaled)."""
    if layer.kind.name != "linear":
        raise RequestError(f"the server serves LoRA on nn.Linear layers, not {layer.kind.name}")
    with torch.no_grad():
        out = {"A": layer.lora_A[name].detach(), "B": layer.lora_B[name].detach() * layer.specs[name].scaling}
        if layer.specs[name].use_dora:
            out["out_scale"] = layer._dora_factor(name).detach().reshape(-1)
    return out


def file_slot_tensors(
    config: LoraConfig, module_name: str, tensors: dict[str, Tensor]
) -> dict[str, Tensor] | None:
    """`slot_tensors` from a file's factors (already in the served dtype), with nothing attached: the
    same numbers, B·scaling rounded in that dtype as the attached layer computes it. None for DoRA,
    whose factor needs the base weight through the layer."""
    if config.use_dora:
        return None
    r, alpha = config.rank_and_alpha(module_name)
    return {"A": tensors["lora_A"], "B": tensors["lora_B"] * config.scaling(r, alpha)}


def weight_problem(config: LoraConfig) -> str | None:
    """Why a LoRA adapter cannot take an inference weight: only DoRA's, whose output is renormalised."""
    if config.use_dora:
        return (
            "it is a DoRA adapter, whose magnitude renormalises the whole weight (m·(W+sBA)/‖W+sBA‖), so "
            "a weighted sum of its change has no clean meaning"
        )
    return None


def wrap(module: nn.Module, kind: LayerKind, state: AdapterState) -> LoraLayer:
    return LoraLayer(module, kind, state)


def check_new_targets(config: LoraConfig, targets: list) -> None:
    """Warnings for a new adapter: override patterns that match nothing, ranks beyond a layer's size."""
    _warn_unused_patterns(config, targets)
    _warn_rank_too_large(config, targets)


def _warn_unused_patterns(config: LoraConfig, targets: list) -> None:
    # A warning, as in HF PEFT: a key that matches no target changes nothing, but is likely a typo.
    for key in ("rank_pattern", "alpha_pattern"):
        unused = [k for k in getattr(config, key) if not any(pattern_matches(k, t.name) for t in targets)]
        if unused:
            warnings.warn(
                f"{key} keys {unused} match no target layer and change nothing; a key is a regex over "
                "the end of the module name after a '.', e.g. 'q_proj' or 'layers[.]0[.]mlp[.]down_proj'",
                stacklevel=4,
            )


def _warn_rank_too_large(config: LoraConfig, targets: list) -> None:
    """B·A has rank at most min(in, out): a larger r adds parameters (and memory) but no capacity."""
    over = []
    for t in targets:
        r = config.rank_and_alpha(t.name)[0]
        fan_in, fan_out = t.kind.dims(t.module)
        if r > min(fan_in, fan_out):
            over.append((t, r, fan_in, fan_out))
    if not over:
        return
    t, r, fan_in, fan_out = over[0]
    limit, leaf = min(fan_in, fan_out), t.name.rsplit(".", 1)[-1]
    more = f" (and {len(over) - 1} more layers)" if len(over) > 1 else ""
    warnings.warn(
        f"rank {r} is more than the smaller dimension of {t.name!r} ({fan_in} in, {fan_out} out){more}: "
        f"the update there has rank at most {limit}, so the extra rank only adds parameters (the "
        f"adapter is {r * (fan_in + fan_out) / (fan_in * fan_out):.1f}x the layer's size). Use r <= {limit}, "
        f"or lower it for those layers with rank_pattern, e.g. {{{leaf!r}: {limit}}}",
        stacklevel=4,
    )


SPEC = MethodSpec(
    name="lora",
    label="LoRA",
    description="low-rank update (alpha/r)·B·A; rsLoRA and DoRA as flags; QLoRA over a 4-bit base",
    config_cls=LoraConfig,
    peft_type="LORA",
    supports_merge=True,
    supports_mixed_batch=True,
    weight_problem=weight_problem,
    variants={"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}},
    layer_cls=LoraLayer,
    kind_of=kind_of,
    wrap=wrap,
    wrappable=SUPPORTED_TYPES,
    unsupported_reason=unsupported_reason,
    expected_shapes=expected_shapes,
    check_new_targets=check_new_targets,
    key_suffix=key_suffix,
    config_to_file=lambda config, layers: config_to_file(
        config, [n for n, _ in layers], [m.kind.name for _, m in layers]
    ),
    config_from_file=config_from_file,
    file_layers=lora_info.file_layers,
    describe_method=lora_info.describe_method,
    describe=lora_info.describe,
    info_rows=lora_info.info_rows,
    train_default=lambda: LoraConfig(r=16, lora_alpha=32),
    slot_tensors=slot_tensors,
    file_slot_tensors=file_slot_tensors,
    slot_roles=frozenset({"A", "B", "out_scale"}),
    lr_scaled_roles=("lora_B",),
    no_decay_roles=("lora_magnitude",),
)
