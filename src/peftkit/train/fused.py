"""Memory-lean replacements for layers whose autograd graph keeps more than backward needs.

transformers' RMSNorm (Llama, Mistral, Qwen2, SmolLM2, ...) computes in fp32 and lets autograd save
the fp32 input, its square and the normalised tensor: per norm, several fp32 copies of a bf16
activation, for ~60 norms in a small model. The function below computes the same outputs bit for
bit but saves only the bf16 input and one fp32 scale per row, and recomputes the rest in backward.

Likewise the SwiGLU MLP saves silu(gate) next to gate and up; the fused product recomputes it.

A module is switched only after checking, on a random input, that the replacement reproduces the
module's own output exactly; anything else (e.g. Gemma's (1 + weight) variant) is left alone.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from ..core.layer_types import float_dtype, is_quantized, unwrap, weight_device


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)  # the same rounding steps as transformers' RMSNorm

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        gy = (grad * weight).float()  # d loss / d (normalised x)
        gx = rstd * (gy - xhat * (gy * xhat).mean(-1, keepdim=True))
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (grad.float() * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return gx.to(x.dtype), gw, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (silu is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))  # d silu / d gate = sig (1 + g (1 - sig))
        return grad_gate, grad * silu


def _fused_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _fused_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_for_training(model: nn.Module) -> int:
    """Give RMSNorms (weight * normalise(x)) and SwiGLU MLPs (down(silu(gate(x)) * up(x))) the lean
    autograd functions above. Returns how many modules were switched (their parameters and
    state_dict are untouched). Each module class is checked once for identical outputs first."""
    verified: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            forward = _fused_forward
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            # Whether act_fn is SiLU (transformers has its own class for it) is left to the output check.
            forward = _fused_mlp_forward
        else:
            continue
        if cls not in verified:
            verified[cls] = _same_outputs(module, forward)
        if verified[cls]:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def _same_outputs(module: nn.Module, forward) -> bool:
    weight = next(module.parameters(), None)
    quantized = next((m for m in module.modules() if is_quantized(m)), None)
    if weight is not None:
        device, dtype = weight.device, weight.dtype
    elif quantized is not None:  # an MLP of 4-bit layers holds no parameter: they compute in this dtype
        device, dtype = weight_device(quantized), float_dtype(quantized)
    else:
        return False
    width = module.weight.shape[0] if forward is _fused_forward else unwrap(module.gate_proj).in_features
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, 5, width, generator=g).to(device, dtype)
    try:
        with torch.no_grad():
            expected, ours = module(x), forward(module, x)
    except Exception:  # an unexpected module layout: leave it alone
        return False
    return isinstance(expected, Tensor) and expected.dtype == ours.dtype and torch.equal(expected, ours)
