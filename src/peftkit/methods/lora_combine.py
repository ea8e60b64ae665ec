"""Combining LoRA adapters of one base into a new LoRA adapter (`AdaptedModel.combine`, `peftkit combine`).

    result = am.combine(["sql", "chat"], [0.7, 0.3], "both", how="ties", density=0.5)
    am.save_adapter("out/both", "both")

The semantics and results are HF PEFT's `add_weighted_adapter` (majority_sign_method="total") on
the same inputs; docs/combine.md states the rules. Every `how` works on each layer separately:

- linear / ties / dare_*: A and B are merged as two separate task tensors, each adapter's factors
  weighted by ±sqrt(|w·s|) (the sign goes on A only), s being its scaling on that layer;
- cat: the factors side by side (A_i·w_i·s_i stacked, B_i next to each other): exact, rank Σ r_i;
- svd: the weighted sum of the deltas Σ w_i·s_i·B_i·A_i, truncated to a target rank by SVD.

A layer that only some of the adapters target combines those (no `how` needs equal targets). The
new adapter's scaling is 1 (lora_alpha = r), as the weights and scalings are folded into the factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ConfigError, RequestError
from .lora import LoraLayer
from .lora_config import LoraConfig

if TYPE_CHECKING:
    from ..core.adapted import AdaptedModel

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")  # factors are merged entry by entry
_DENSITY = ("ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class CombineResult:
    """What `combine` made. For svd, relative_error is ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F over all layers
    together (ΔW the exact weighted delta, ΔW_r its rank-r truncation) and worst_layer the layer
    with the largest such error; both None for the exact kinds."""

    name: str
    how: str
    rank: int
    layers: int
    relative_error: float | None = None
    worst_layer: tuple[str, float] | None = None

    def summary(self) -> str:
        text = f"adapter {self.name!r}: LoRA r={self.rank} on {self.layers} layers ({self.how})"
        if self.relative_error is not None and self.worst_layer is not None:
            layer, err = self.worst_layer
            text += (
                f"\nrelative reconstruction error of the delta: {self.relative_error:.4g} "
                f"(worst layer {layer}: {err:.4g})"
            )
        return text


def check_request(
    n_adapters: int, weights: list[float], how: str, density: float | None, rank: int | None
) -> None:
    """The checks that need no model: run before any slow load."""
    if how not in HOWS:
        raise RequestError(f"how={how!r} is not a way to combine adapters; choose one of {', '.join(HOWS)}")
    if n_adapters < 1:
        raise RequestError("combine needs at least one adapter")
    if len(weights) != n_adapters:
        raise RequestError(
            f"{len(weights)} weight(s) for {n_adapters} adapter(s); give one weight per adapter"
        )
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise RequestError(f"weights must be finite numbers, got {list(weights)}")
    if how in _DENSITY:
        if density is None or not (0 < density <= 1):
            raise RequestError(
                f"how={how} needs density in (0, 1] (the fraction of each task tensor kept), got {density}"
            )
    elif density is not None:
        raise RequestError(f"density applies to {', '.join(_DENSITY)} only, not how={how}")
    if how == "svd":
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise RequestError(f"the svd rank must be a positive integer, got {rank!r}")
    elif rank is not None:
        raise RequestError(f"rank applies to how=svd only (how={how} sets the rank itself)")


def combine_adapters(
    am: AdaptedModel,
    adapters: list[str],
    weights: list[float],
    name: str,
    how: str = "svd",
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int | None = None,
) -> CombineResult:
    """Add adapter `name` to `am`, combined from its LoRA `adapters` (see the module docstring).

    seed: for dare_*, the random masks come from a generator seeded with it (None: torch's global
    generator, as HF PEFT draws them). Nothing changes in `am` when a check fails.
    """
    check_request(len(adapters), list(weights), how, density, rank)
    am._check_new_name(name)
    for n in adapters:
        am.check_exists(n)
        _check_lora(n, am.configs[n])
    layers = [(m, layer) for m, layer in am.adapter_layers() if any(n in layer.specs for n in adapters)]
    ranks = {n: max((lay.specs[n].r for _, lay in layers if n in lay.specs), default=0) for n in adapters}
    new_rank = combined_rank(how, ranks, rank)
    generator = None
    if seed is not None and how.startswith("dare"):
        generator = torch.Generator(layers[0][1].lora_A[adapters[0]].device).manual_seed(seed)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, tuple[float, float]] = {}  # svd: layer -> (squared error, squared norm)
    with torch.no_grad():
        for module, layer in layers:  # in the model's module order, as HF PEFT (the dare draws follow it)
            parts = [(n, float(w)) for n, w in zip(adapters, weights, strict=True) if n in layer.specs]
            if how == "cat":
                factors[module] = _cat(layer, parts, new_rank)
            elif how == "svd":
                a, b, errors[module] = _svd(layer, parts, new_rank)
                factors[module] = (a, b)
            else:
                factors[module] = _task_arithmetic(module, layer, parts, how, density, generator)
    first = am.configs[adapters[0]]
    config = LoraConfig(
        r=new_rank, lora_alpha=new_rank, lora_dropout=first.lora_dropout, target_modules=tuple(factors)
    )
    am.add_adapter(name, config, trainable=False, dtype=layers[0][1].lora_A[adapters[0]].dtype)
    for module, layer in am.adapter_layers():
        if module in factors:
            layer.lora_A[name].data.copy_(factors[module][0])
            layer.lora_B[name].data.copy_(factors[module][1])
    return _result(name, how, new_rank, len(factors), errors)


def _check_lora(name: str, config: Any) -> None:
    if not isinstance(config, LoraConfig):
        raise ConfigError(
            f"adapter {name!r} is a {type(config).__name__.removesuffix('Config')} adapter; "
            "combine takes LoRA adapters only"
        )
    if config.use_dora:
        raise ConfigError(
            f"adapter {name!r} is a DoRA adapter: its magnitudes depend on the base weight and do not "
            "combine; combine plain LoRA or rsLoRA adapters"
        )
    if config.bias != "none" or config.modules_to_save:
        raise ConfigError(
            f"adapter {name!r} also trains biases or whole modules (bias={config.bias!r}, "
            f"modules_to_save={config.modules_to_save}); combine takes adapters made of LoRA factors only"
        )


def combined_rank(how: str, ranks: dict[str, int], rank: int | None) -> int:
    if how in _SAME_RANK and len(set(ranks.values())) > 1:
        raise ConfigError(
            f"how={how} merges the factors entry by entry, so the adapters need one rank; they have "
            f"{ranks}. Use how=cat (exact, rank {sum(ranks.values())}) or how=svd"
        )
    if how == "cat":
        return sum(ranks.values())
    if how == "svd":
        return rank or max(ranks.values())
    return next(iter(ranks.values()))


def _cat(layer: LoraLayer, parts: list[tuple[str, float]], new_rank: int) -> tuple[Tensor, Tensor]:
    """A_i·w_i·s_i stacked along the rank, B_i side by side: B·A = Σ w_i·s_i·B_i·A_i exactly."""
    a = torch.cat([layer.lora_A[n] * w * layer.specs[n].scaling for n, w in parts], dim=0)  # (Σr, in...)
    b = torch.cat([layer.lora_B[n] for n, _ in parts], dim=1)  # (out, Σr, ...)
    return _pad(a, new_rank, 0), _pad(b, new_rank, 1)


def _svd(
    layer: LoraLayer, parts: list[tuple[str, float]], new_rank: int
) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """The rank-`new_rank` truncation of Σ w_i·s_i·B_i·A_i; B = U·S, A = Vh."""
    deltas = torch.stack([layer.delta_matrix(n) for n, _ in parts])  # (n, out, in_flat) float32
    weights = torch.tensor([w for _, w in parts], device=deltas.device).view(-1, 1, 1)
    delta = (deltas * weights).sum(dim=0)  # (out, in_flat)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(new_rank, s.numel())
    b = u[:, :k] * s[:k]  # (out, k)
    a = vh[:k]  # (k, in_flat)
    ref_a, ref_b = layer.lora_A[parts[0][0]], layer.lora_B[parts[0][0]]
    a = _pad(a, new_rank, 0).reshape(new_rank, *ref_a.shape[1:]).to(ref_a.dtype)
    b = _pad(b, new_rank, 1).reshape(b.shape[0], new_rank, *ref_b.shape[2:]).to(ref_b.dtype)
    return a, b, (float(s[k:].square().sum()), float(s.square().sum()))


def _task_arithmetic(
    module: str,
    layer: LoraLayer,
    parts: list[tuple[str, float]],
    how: str,
    density: float | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """A and B each merged as task tensors; w·s is split as ±sqrt(|w·s|) on A, sqrt(|w·s|) on B."""
    shapes = {n: tuple(layer.lora_A[n].shape) for n, _ in parts}
    if len(set(shapes.values())) > 1:
        raise ConfigError(
            f"how={how}: the adapters have different ranks on {module} ({shapes}); use cat or svd"
        )
    scaled = [w * layer.specs[n].scaling for n, w in parts]
    w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
    w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    dtype = layer.lora_A[parts[0][0]].dtype
    merged = []
    for role, w in (("A", w_a), ("B", w_b)):  # all of A's draws, then B's (HF PEFT's order)
        table = layer.lora_A if role == "A" else layer.lora_B
        tensors = [table[n].detach() for n, _ in parts]
        merged.append(merge_task_tensors(tensors, w.to(tensors[0].device), how, density, generator).to(dtype))
    return merged[0], merged[1]


def merge_task_tensors(
    tensors: list[Tensor],
    weights: Tensor,
    how: str,
    density: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One merged tensor from same-shaped task tensors and their weights (n,).

    ties: keep each tensor's `density` fraction of largest-magnitude entries; elect each entry's sign
    as the sign of the sum of the kept (unweighted) values (a tie elects +); average the weighted
    kept values that have the elected sign (zero where none has). dare_*: keep each entry with
    probability `density` and divide the kept by `density`, then sum (dare_linear) or elect and
    average as ties (dare_ties). linear: the weighted sum. density 1 keeps everything (no draws).
    """
    if how == "ties" and density is not None and density < 1:
        tensors = [_keep_largest(t, density) for t in tensors]
    elif how.startswith("dare") and density is not None and density < 1:
        tensors = [_keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if how in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    elected = torch.where(stacked.sum(dim=0) >= 0, 1, -1)  # (*shape)
    agrees = stacked.sign() == elected  # (n, *shape); zeros (trimmed entries) never agree
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _keep_largest(t: Tensor, density: float) -> Tensor:
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _keep_random(t: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _pad(t: Tensor, size: int, dim: int) -> Tensor:
    """Zero-pad the rank dimension `dim` of a factor up to `size` (a layer some adapters skip)."""
    missing = size - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _result(
    name: str, how: str, rank: int, layers: int, errors: dict[str, tuple[float, float]]
) -> CombineResult:
    if not errors:
        return CombineResult(name, how, rank, layers)
    total_err, total_norm = (sum(e[i] for e in errors.values()) for i in (0, 1))
    per_layer = {m: math.sqrt(e / n) if n > 0 else 0.0 for m, (e, n) in errors.items()}
    worst = max(per_layer, key=per_layer.__getitem__)
    overall = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
    return CombineResult(name, how, rank, layers, overall, (worst, per_layer[worst]))
