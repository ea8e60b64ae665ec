"""Rank reduction of a LoRA layer by SVD (`peftkit compress`): pure tensor functions, no files.

One layer with factors A (r, in), B (out, r) and scaling s applies ΔW = s·B·A (out, in). Its SVD comes
from the factors alone: with thin QRs B = Qb·Rb and Aᵀ = Qa·Ra, ΔW = Qb·(s·Rb·Raᵀ)·Qaᵀ, so the SVD
of the small core s·Rb·Raᵀ = Um·S·Vmᵀ gives ΔW = (Qb·Um)·S·(Qa·Vm)ᵀ. That costs O((out + in)·r²), never
builds the out×in matrix, and runs in float64 so the reported error is the stored adapter's, not
rounding. Keeping the k largest singular values is the best rank-k approximation in the Frobenius
norm (Eckart–Young); its relative error is sqrt(Σ_{i≥k} σ_i² / Σ σ_i²).

    layer = compress_layer(a, b, scaling, energy=0.95)
    layer.a, layer.b          # A' = √S_k·V_kᵀ (k, in), B' = U_k·√S_k (out, k): B'·A' ≈ s·B·A, scaling 1

The factor layouts are PEFT's for every layer kind: A is (r, *in_dims) (an embedding's A is
(r, num_embeddings), a convolution's (r, in_channels, *kernel)), B is (out, r, *ones); the rank is
dimension 0 of A and dimension 1 of B, and the other dimensions are flattened for the algebra and
restored on the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import RequestError
from .lora import key_suffix
from .lora_kinds import EmbeddingKind, LinearKind

# A singular value below max(out, in)·eps·σ_max is numerically zero (the usual rank tolerance, as in
# numpy.linalg.matrix_rank). eps is float32's: adapters are stored in float32 or coarser, so nothing
# below float32 rounding of the product is a direction the adapter learnt.
_EPS = torch.finfo(torch.float32).eps

# The file-key suffixes of a layer's (A, B) factors, per the names `lora.key_suffix` gives: embeddings
# have their own, every other kind (linear, GPT-2 Conv1D, convolutions) shares the linear ones.
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    (key_suffix("lora_A", kind), key_suffix("lora_B", kind)) for kind in (LinearKind(False), EmbeddingKind())
)


@dataclass(frozen=True)
class CompressedLayer:
    """One layer's rank-reduced factors (float64, scaling folded in) and what was dropped.

    `kept` is the number of singular values kept; a zero update keeps none, and its factors are then
    one rank of zeros (PEFT and peftkit need r ≥ 1 on every targeted layer), so `rank` is 1."""

    a: Tensor  # (k, *in_dims)
    b: Tensor  # (out, k, *ones)
    kept: int
    norm_sq: float  # ‖ΔW‖_F² = Σ σ_i²
    error_sq: float  # ‖ΔW − B'·A'‖_F² = Σ_{i≥k} σ_i²

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def relative_error(self) -> float:
        """‖ΔW − B'·A'‖_F / ‖ΔW‖_F (0 for a zero update, which is kept exactly)."""
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


def check_target(rank: int | None, energy: float | None) -> None:
    """Exactly one of `rank` (a positive integer) and `energy` (in (0, 1]), else a RequestError."""
    if (rank is None) == (energy is None):
        given = "both" if rank is not None else "neither"
        raise RequestError(
            f"compress needs one target, {given} given: --rank R (keep at most R singular values per "
            "layer) or --energy E (keep the fraction E of each layer's squared singular values)"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RequestError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1
    ):
        raise RequestError(
            f"--energy must be a number in (0, 1] (the fraction of each layer's squared singular "
            f"values kept; 1.0 keeps the update exactly), got {energy!r}"
        )


def delta_svd(a: Tensor, b: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD (U, S, Vᵀ) of ΔW = scaling·B·A in float64, from QRs of the factors (see the module
    docstring); S is descending and has min(out, in, r) entries."""
    a2 = a.detach().reshape(a.shape[0], -1).to(torch.float64)  # (r, in)
    b2 = b.detach().reshape(b.shape[0], b.shape[1]).to(torch.float64)  # (out, r)
    qb, rb = torch.linalg.qr(b2)  # (out, p), (p, r); p = min(out, r)
    qa, ra = torch.linalg.qr(a2.T)  # (in, q), (q, r); q = min(in, r)
    core = scaling * (rb @ ra.T)  # (p, q)
    um, s, vmh = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    return qb @ um, s, vmh @ qa.T  # (out, m), (m,), (m, in)


def numerical_rank(s: Tensor, dims: tuple[int, int]) -> int:
    """How many singular values `s` (descending) of an (out, in) matrix are above numerical zero."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > max(dims) * _EPS * s[0]).sum())


def kept_rank(
    s: Tensor, dims: tuple[int, int], *, rank: int | None = None, energy: float | None = None
) -> int:
    """How many singular values to keep: min(rank, numerical rank), or the smallest k whose share of
    Σ σ² reaches `energy` (never past the numerical rank, so energy 1.0 keeps exactly the true rank)."""
    true_rank = numerical_rank(s, dims)
    if rank is not None:
        return min(rank, true_rank)
    assert energy is not None
    if true_rank == 0:
        return 0
    cumulative = s.square().cumsum(0)  # (m,)
    # The total is the cumsum's own last entry (not a separate sum), so energy 1.0 is reached exactly.
    short = int((cumulative < energy * cumulative[-1]).sum())  # prefixes still below the target
    return min(short + 1, true_rank)


def compress_layer(
    a: Tensor, b: Tensor, scaling: float, *, rank: int | None = None, energy: float | None = None
) -> CompressedLayer:
    """The layer's update scaling·B·A truncated to the rank `rank` or `energy` asks for (exactly one of
    them), as new float64 factors with the scale folded in: B' = U_k·√S_k, A' = √S_k·V_kᵀ. The square
    root splits each singular value evenly, so neither factor carries the whole magnitude (which keeps
    both in fp16's range when stored that way)."""
    check_target(rank, energy)
    u, s, vh = delta_svd(a, b, scaling)
    dims = (u.shape[0], vh.shape[1])
    k = kept_rank(s, dims, rank=rank, energy=energy)
    squares = s.square()
    norm_sq, error_sq = float(squares.sum()), float(squares[k:].sum())
    if k == 0:  # a zero update (or all numerical noise): one rank of zeros
        new_a, new_b = vh.new_zeros(1, dims[1]), u.new_zeros(dims[0], 1)
    else:
        root = s[:k].sqrt()  # (k,)
        new_a, new_b = root[:, None] * vh[:k], u[:, :k] * root  # (k, in), (out, k)
    r = new_a.shape[0]
    return CompressedLayer(
        a=new_a.reshape(r, *a.shape[1:]),
        b=new_b.reshape(b.shape[0], r, *b.shape[2:]),
        kept=k,
        norm_sq=norm_sq,
        error_sq=error_sq,
    )
