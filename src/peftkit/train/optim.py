"""Optimisation: AdamW over fp32 master weights, LoRA+ groups, and the learning-rate schedule.

In bf16 training the model computes with bf16 weights (fast matrix products, no per-op dtype
copies as under autocast) while the optimizer updates fp32 masters of the few trainable
parameters, so small updates are not lost to bf16 rounding. The schedule is a pure function of
the step, so a resumed run needs no scheduler state beyond the step number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..methods.spec import MethodSpec
from .config import TrainConfig


@dataclass
class Trainable:
    """The parameters that train: `params` (what the model computes with) and their fp32 `masters`
    (the same tensors when the model is already fp32)."""

    names: list[str]
    params: list[nn.Parameter]
    masters: list[Tensor]
    roles: list[tuple[MethodSpec, str] | None]  # each parameter's method and role (None: not an adapter's)

    @classmethod
    def of(cls, model: nn.Module) -> Trainable:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise RuntimeError("nothing to train: no parameter requires grad")
        names, params = [n for n, _ in named], [p for _, p in named]
        masters = [
            p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for p in params
        ]
        by_id = model.parameter_roles() if hasattr(model, "parameter_roles") else {}
        return cls(names, params, masters, [by_id.get(id(p)) for p in params])

    @property
    def separate_masters(self) -> bool:
        return any(m is not p for m, p in zip(self.masters, self.params))

    def grads_to_masters(self) -> None:
        """Move the model's gradients onto the masters (in fp32)."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Copy updated masters into the model's (lower precision) parameters."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    @contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """While inside, the model's parameters hold the fp32 masters (to save full precision)."""
        saved = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters):
            p.data = m.data
        try:
            yield
        finally:
            for p, data in zip(self.params, saved):
                p.data = data

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def make_optimizer(trainable: Trainable, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with up to three groups: the roles a method trains faster (LoRA+: the B matrices, at lr x
    lora_plus_ratio), other decayed weights, and parameters that never decay (biases, norms, 1-d
    vectors, and roles the method exempts, e.g. DoRA magnitudes)."""
    groups: dict[str, list[Tensor]] = {"b": [], "decay": [], "no_decay": []}
    for name, master, role in zip(trainable.names, trainable.masters, trainable.roles):
        spec, what = role if role is not None else (None, "")
        if spec is not None and what in spec.lr_scaled_roles:
            groups["b"].append(master)
        elif master.dim() < 2 or name.endswith("bias") or (spec is not None and what in spec.no_decay_roles):
            groups["no_decay"].append(master)
        else:
            groups["decay"].append(master)
    lr = config.lr
    spec = [
        {
            "params": groups["b"],
            "lr": lr * config.lora_plus_ratio,
            "weight_decay": config.weight_decay,
            "scale": config.lora_plus_ratio,
        },
        {"params": groups["decay"], "lr": lr, "weight_decay": config.weight_decay, "scale": 1.0},
        {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0, "scale": 1.0},
    ]
    # foreach=False: identical arithmetic whatever the parameter layout, so resumed runs match.
    return torch.optim.AdamW(
        [g for g in spec if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False
    )


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total`."""
    warmup = int(round(config.warmup_ratio * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant" or total <= warmup:
        return config.lr
    progress = (step - warmup) / max(1, total - warmup)
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["scale"]
