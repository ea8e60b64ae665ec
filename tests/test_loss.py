"""The chunked, fused head loss equals plain cross-entropy over full logits, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import AdaptedModel, LoraConfig
from peftkit.train.loss import head_loss_sum, labelled_hidden

H, V = 12, 57


def reference(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, V).double(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, H, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (3, 9), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    return hidden, labels


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_loss_and_gradients_equal_full_logits_cross_entropy(chunk: int, train_head: bool) -> None:
    head = nn.Linear(H, V, bias=False).double().requires_grad_(train_head)
    hidden, labels = batch(torch.float64)
    h, y = labelled_hidden(hidden, labels)
    assert y.numel() == int((labels[:, 1:] != -100).sum())
    ours = head_loss_sum(head, h, y, chunk=chunk)
    ours.backward(torch.tensor(0.5, dtype=torch.float64))  # a non-unit upstream gradient
    grads = (hidden.grad.clone(), head.weight.grad.clone() if train_head else None)
    hidden.grad, head.weight.grad = None, None
    ref = reference(head, hidden, labels)
    (0.5 * ref).backward()
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-12, rtol=1e-12)
    if train_head:
        torch.testing.assert_close(grads[1], head.weight.grad, atol=1e-12, rtol=1e-12)


def test_a_head_with_its_own_adapter_takes_the_checkpointed_path() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(H, V, bias=False).double()

    am = AdaptedModel.attach(Model(), LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    head = am.model.head  # a LoraLayer, not a plain Linear
    hidden, labels = batch(torch.float64)
    h, y = labelled_hidden(hidden, labels)
    ours = head_loss_sum(head, h, y, chunk=5)
    ours.backward()
    got = (hidden.grad.clone(), head.lora_B["default"].grad.clone())
    hidden.grad = None
    head.lora_B["default"].grad = None
    ref = reference(head, hidden, labels)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], head.lora_B["default"].grad)


def test_bf16_loss_is_close_to_fp64() -> None:
    head = nn.Linear(H, V, bias=False).double()
    hidden, labels = batch(torch.float64)
    ref = reference(head, hidden, labels)
    h, y = labelled_hidden(hidden.detach().bfloat16().requires_grad_(), labels)
    ours = head_loss_sum(head.bfloat16(), h, y, chunk=3)
    assert ours.dtype == torch.float32  # softmax and sums run in fp32 even for bf16 inputs
    assert abs(ours.item() - ref.item()) < 0.02 * ref.item()


def test_no_labelled_positions_give_zero_loss_and_zero_gradient() -> None:
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(2, 4, H, requires_grad=True)
    h, y = labelled_hidden(hidden, torch.full((2, 4), -100))
    loss = head_loss_sum(head, h, y)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0
