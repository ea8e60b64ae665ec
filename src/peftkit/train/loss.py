"""Next-token cross-entropy on the labelled positions only, without full-vocabulary logits.

A causal LM's head turns each hidden state into |V| logits (49,152 for SmolLM2); materialising them
for every position of a batch, then log-softmax, then their gradient, is a large share of a training
step. Here the head runs only where there is a label (the answer tokens), in chunks, and the
gradient with respect to the hidden states (and the head weight, if it trains) is computed inside
the forward pass, so no chunk's logits outlive it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.encode import IGNORE_INDEX

CHUNK = 256  # labelled positions per head evaluation: 256 x 49152 fp32 logits = 50 MB


def labelled_hidden(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states that predict a label, and those labels (next-token shift applied).

    hidden (B, T, H), labels (B, T) unshifted (HF convention) -> (N, H), (N,)
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    return hidden[:, :-1][mask], targets[mask]


class _FusedHeadCE(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.weight_dtype = weight.dtype
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums in at least fp32
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]
            logits = (hc @ weight.t()).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None:
                continue
            probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
            probs[torch.arange(yc.shape[0], device=yc.device), yc] -= 1.0  # d loss / d logits
            dlogits = probs.to(weight.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = dlogits @ weight  # (c, H)
            if grad_w is not None:
                grad_w += dlogits.t().to(acc) @ hc.to(acc)  # (V, H)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def head_loss_sum(head: nn.Module, h: Tensor, targets: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """Sum of next-token cross-entropies of `targets` given hidden states `h` (N, H).

    Uses the fused chunked path for a plain linear head without bias; any other head (e.g. one with
    a LoRA adapter of its own) runs per chunk under activation checkpointing, which recomputes the
    chunk's logits in backward instead of keeping them.
    """
    if h.shape[0] == 0:
        return h.sum() * 0.0
    if type(head) is nn.Linear and head.bias is None:
        return _FusedHeadCE.apply(h, head.weight, targets, chunk)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start : start + chunk], targets[start : start + chunk]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
    return total


def _chunk_ce(head: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    logits = head(h)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum")
