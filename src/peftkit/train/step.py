"""The loss of one batch, and the validation loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batching import collate
from ..data.encode import IGNORE_INDEX
from . import distributed
from .loss import head_loss_sum, labelled_hidden

if TYPE_CHECKING:
    from .setup import Prepared


def batch_loss(p: Prepared, inputs: dict[str, Tensor]) -> Tensor:
    """Sum of next-token cross-entropies over the batch's labelled tokens."""
    if p.head is not None:
        out = p.backbone(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        h, y = labelled_hidden(out.last_hidden_state, inputs["labels"])  # (N, H), (N,)
        return head_loss_sum(p.head, h, y)
    logits = p.net(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        inputs["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def validation_loss(p: Prepared) -> float:
    """Mean cross-entropy per labelled token over the validation set (all processes together)."""
    d = p.dist
    p.net.eval()
    order = sorted(range(len(p.val_set)), key=lambda i: len(p.val_set[i]))  # little padding
    size = p.config.batch_size * d.world
    total, count = 0.0, 0
    for start in range(0, len(order), size):
        part = [p.val_set[i] for i in order[start : start + size][d.rank :: d.world]]
        if not part:
            continue
        inputs = {k: v.to(d.device) for k, v in collate(part, p.pad_id).items()}
        total += batch_loss(p, inputs).item()
        count += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    p.net.train()
    return distributed.all_sum(total, d) / max(distributed.all_sum(count, d), 1)
