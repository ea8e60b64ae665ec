"""Data parallelism with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 2 -m peftkit train config.yaml

Every process holds the whole model and takes its share of each global micro-batch; gradients are
summed across processes once per optimizer step (one flattened all-reduce) and the loss is
normalised by the global number of labelled tokens, so N processes with batch b compute the same
update as one process with batch N x b. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def all_sum(value: float | int, d: Dist) -> float:
    """A number summed over all processes."""
    if d.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def all_sum_grads(tensors: list[Tensor], d: Dist) -> None:
    """Sum the gradients of `tensors` over all processes, in place (one flattened all-reduce)."""
    if d.world == 1:
        return
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for t, g in zip(tensors, _unflatten_dense_tensors(flat, grads)):
        t.grad = g


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
