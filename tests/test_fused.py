"""The lean RMSNorm and SwiGLU autograd functions: same outputs bit for bit, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import model_input, tiny_llama
from torch import nn

from peftkit.train.fused import fuse_for_training


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_llama_matches_the_original_in_outputs_and_every_gradient(
    dtype: torch.dtype, tol: float
) -> None:
    fused = tiny_llama().to(dtype).train()
    plain = copy.deepcopy(fused)
    assert fuse_for_training(fused) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    x = model_input("llama", batch=2, seq=9)
    out, ref = fused(x).logits, plain(x).logits
    assert torch.equal(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        scale = q.grad.float().abs().max().clamp_min(1e-12)
        assert ((p.grad.float() - q.grad.float()).abs().max() / scale) < tol, name
    # A state_dict round trip is unaffected: the modules keep their parameters.
    assert fused.state_dict().keys() == plain.state_dict().keys()


class OnePlusNorm(nn.Module):
    """Gemma-style: (1 + weight) * normalise(x); the fused function must not replace it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (1 + self.weight) * (
            x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )


OnePlusNorm.__name__ = "GemmaLikeRMSNorm"


def test_modules_with_other_formulas_are_left_alone() -> None:
    model = nn.Sequential(OnePlusNorm(8))
    x = torch.randn(2, 8)
    before = model(x)
    assert fuse_for_training(model) == 0
    assert torch.equal(model(x), before)
