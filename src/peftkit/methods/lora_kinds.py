"""How a low-rank update ΔW = B·A applies to each layer type.

Every kind answers the same questions (the `LayerKind` protocol) with pure functions over the base
layer and the factors A, B, so `LoraLayer` never branches on the layer type:

- the factor shapes for rank r, in the PEFT layout (so state dicts convert by renaming only);
- the weight as a matrix (out, in_flat) and back, for merging and for DoRA's row norms;
- the adapter path for one adapter: features h = A(x), output B(h);
- the mixed-batch path over stacked factors, gathered per row (one batched product per layer).

The kinds: nn.Linear, transformers' GPT-2 `Conv1D` (weight stored (in, out)), nn.Embedding, and
nn.Conv1d/2d/3d (groups=1). In every kind B is a plain projection of the rank-r features (a 1×1
convolution for convs), so the merged delta is B_flat @ A_flat.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layer_types import dense_weight, layer_type, weight_shape


class LayerKind(Protocol):
    """What `LoraLayer` needs to know about one layer type."""

    name: str
    channel_dim: int  # where output features sit in the layer's output: -1, or 1 for convolutions
    supports_dropout: bool  # dropout on the input makes sense (not for token ids)

    def dims(self, base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the base layer; in_features is the flattened fan-in."""
        ...

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]: ...
    def magnitude_shape(self, base: nn.Module) -> tuple[int, ...]: ...
    def weight_matrix(self, base: nn.Module, weight: Tensor | None = None) -> Tensor: ...
    def to_native(self, base: nn.Module, matrix: Tensor) -> Tensor: ...
    def features(self, base: nn.Module, x: Tensor, a: Tensor) -> Tensor: ...
    def project(self, base: nn.Module, h: Tensor, b: Tensor) -> Tensor: ...
    def base_no_bias(self, base: nn.Module, x: Tensor) -> Tensor: ...
    def bias_view(self, base: nn.Module, ndim: int) -> Tensor | None: ...
    def stack(self, a: list[Tensor], b: list[Tensor], r_max: int) -> tuple[Tensor, Tensor]: ...
    def mixed(
        self, base: nn.Module, x: Tensor, sa: Tensor, sb: Tensor, rows: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Each row's delta B_row·A_row·x_row; added into `out` in place (and returned) when given."""
        ...


def _pad_rank(t: Tensor, r_max: int, dim: int) -> Tensor:
    """Zero-pad a factor along its rank dimension so factors of different ranks stack."""
    if t.shape[dim] == r_max:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = r_max - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


class LinearKind:
    """nn.Linear (weight (out, in)) and GPT-2's Conv1D (weight (in, out), `transposed`)."""

    channel_dim = -1
    supports_dropout = True

    def __init__(self, transposed: bool) -> None:
        self.transposed = transposed
        self.name = "conv1d_gpt2" if transposed else "linear"

    def dims(self, base: nn.Module) -> tuple[int, int]:
        rows, cols = weight_shape(base)
        return (rows, cols) if self.transposed else (cols, rows)

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        fan_in, fan_out = self.dims(base)
        return (r, fan_in), (fan_out, r)

    def magnitude_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (self.dims(base)[1],)

    def weight_matrix(self, base: nn.Module, weight: Tensor | None = None) -> Tensor:
        w = dense_weight(base) if weight is None else weight
        return w.t() if self.transposed else w

    def to_native(self, base: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.t() if self.transposed else matrix

    def features(self, base: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        return F.linear(x, a)  # (..., r)

    def project(self, base: nn.Module, h: Tensor, b: Tensor) -> Tensor:
        return F.linear(h, b)  # (..., out)

    def base_no_bias(self, base: nn.Module, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_matrix(base).to(x.dtype))

    def bias_view(self, base: nn.Module, ndim: int) -> Tensor | None:
        return base.bias

    def stack(self, a: list[Tensor], b: list[Tensor], r_max: int) -> tuple[Tensor, Tensor]:
        # Stored pre-transposed for bmm: A^T (n, in, r) and B^T (n, r, out).
        sa = torch.stack([_pad_rank(t, r_max, 0).t() for t in a]).contiguous()
        sb = torch.stack([_pad_rank(t, r_max, 1).t() for t in b]).contiguous()
        return sa, sb

    def mixed(
        self, base: nn.Module, x: Tensor, sa: Tensor, sb: Tensor, rows: Tensor, out: Tensor | None = None
    ) -> Tensor:
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1])  # (N, L, in)
        h = torch.bmm(x3, sa.index_select(0, rows))  # (N, L, r)
        return _second_bmm(h, sb.index_select(0, rows), x.shape[:-1], out)


class EmbeddingKind:
    """nn.Embedding: A is (r, num_embeddings), B is (embedding_dim, r), as PEFT stores them."""

    name = "embedding"
    channel_dim = -1
    supports_dropout = False

    def dims(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, base.num_embeddings), (base.embedding_dim, r)

    def magnitude_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (base.embedding_dim,)

    def weight_matrix(self, base: nn.Module, weight: Tensor | None = None) -> Tensor:
        return (base.weight if weight is None else weight).t()  # (dim, num)

    def to_native(self, base: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.t()

    def features(self, base: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        return F.embedding(x, a.t(), padding_idx=base.padding_idx)  # (..., r)

    def project(self, base: nn.Module, h: Tensor, b: Tensor) -> Tensor:
        return h @ b.t()  # (..., dim)

    def base_no_bias(self, base: nn.Module, x: Tensor) -> Tensor:
        return F.embedding(x, base.weight, padding_idx=base.padding_idx)

    def bias_view(self, base: nn.Module, ndim: int) -> Tensor | None:
        return None

    def stack(self, a: list[Tensor], b: list[Tensor], r_max: int) -> tuple[Tensor, Tensor]:
        # A^T rows for all adapters in one table (n * num, r), so a row gather is one embedding lookup.
        sa = torch.cat([_pad_rank(t, r_max, 0).t() for t in a]).contiguous()
        sb = torch.stack([_pad_rank(t, r_max, 1).t() for t in b]).contiguous()  # (n, r, dim)
        return sa, sb

    def mixed(
        self, base: nn.Module, x: Tensor, sa: Tensor, sb: Tensor, rows: Tensor, out: Tensor | None = None
    ) -> Tensor:
        n = x.shape[0]
        ids = x.reshape(n, -1) + rows.view(n, 1) * base.num_embeddings  # (N, L) into the joint table
        h = F.embedding(ids, sa)  # (N, L, r)
        return _second_bmm(h, sb.index_select(0, rows), x.shape, out)


class ConvKind:
    """nn.Conv1d/2d/3d with groups=1: A is a conv with the base's kernel, B a 1×1 conv."""

    channel_dim = 1
    supports_dropout = True

    def __init__(self, nd: int) -> None:
        self.nd = nd
        self.name = f"conv{nd}d"
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]

    def dims(self, base: nn.Module) -> tuple[int, int]:
        w = base.weight
        return w[0].numel(), w.shape[0]

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w = base.weight
        return (r, *w.shape[1:]), (w.shape[0], r, *([1] * self.nd))

    def magnitude_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (1, base.weight.shape[0], *([1] * self.nd))

    def weight_matrix(self, base: nn.Module, weight: Tensor | None = None) -> Tensor:
        w = base.weight if weight is None else weight
        return w.reshape(w.shape[0], -1)

    def to_native(self, base: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.reshape(weight_shape(base))

    def _geometry(self, base: nn.Module) -> dict:
        return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}

    def features(self, base: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        return self.conv(x, a, None, **self._geometry(base))  # (N, r, *S)

    def project(self, base: nn.Module, h: Tensor, b: Tensor) -> Tensor:
        return self.conv(h, b)  # (N, out, *S)

    def base_no_bias(self, base: nn.Module, x: Tensor) -> Tensor:
        return self.conv(x, base.weight.to(x.dtype), None, **self._geometry(base))

    def bias_view(self, base: nn.Module, ndim: int) -> Tensor | None:
        if base.bias is None:
            return None
        return base.bias.view(1, -1, *([1] * (ndim - 2)))

    def stack(self, a: list[Tensor], b: list[Tensor], r_max: int) -> tuple[Tensor, Tensor]:
        sa = torch.stack([_pad_rank(t, r_max, 0) for t in a]).contiguous()  # (n, r, C, *k)
        sb = torch.stack([_pad_rank(t, r_max, 1) for t in b]).contiguous()  # (n, out, r, *1)
        return sa, sb

    def mixed(
        self, base: nn.Module, x: Tensor, sa: Tensor, sb: Tensor, rows: Tensor, out: Tensor | None = None
    ) -> Tensor:
        # One grouped convolution per factor: each batch row is its own group with its own weights.
        n = x.shape[0]
        a = sa.index_select(0, rows).flatten(0, 1)  # (N*r, C, *k)
        b = sb.index_select(0, rows).flatten(0, 1)  # (N*out, r, *1)
        xg = x.reshape(1, -1, *x.shape[2:])  # (1, N*C, *S)
        h = self.conv(xg, a, None, groups=n, **self._geometry(base))  # (1, N*r, *S')
        delta = self.conv(h, b, None, groups=n)  # (1, N*out, *S')
        delta = delta.view(n, -1, *delta.shape[2:])
        return delta if out is None else out.add_(delta)


def _second_bmm(h: Tensor, b_rows: Tensor, lead: torch.Size, out: Tensor | None) -> Tensor:
    """h @ B_row per row, (N, L, r) x (N, r, out); fused into `out` (baddbmm_) when given."""
    if out is None:
        delta = torch.bmm(h, b_rows)  # (N, L, out)
        return delta.view(*lead, delta.shape[-1])
    out.view(h.shape[0], h.shape[1], -1).baddbmm_(h, b_rows)
    return out


LINEAR = LinearKind(transposed=False)
GPT2_CONV1D = LinearKind(transposed=True)
EMBEDDING = EmbeddingKind()
CONVS = {1: ConvKind(1), 2: ConvKind(2), 3: ConvKind(3)}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The LoRA kind for a module, or None if LoRA cannot adapt it."""
    return _KINDS.get(layer_type(module) or "")


_KINDS: dict[str, LayerKind] = {
    "linear": LINEAR,
    "conv1d_gpt2": GPT2_CONV1D,
    "embedding": EMBEDDING,
    **{f"conv{nd}d": kind for nd, kind in CONVS.items()},
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported type still cannot take LoRA, or None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return "transposed convolutions are not supported"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "embeddings with max_norm are not supported"
    return None


SUPPORTED_TYPES = "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers Conv1D"
