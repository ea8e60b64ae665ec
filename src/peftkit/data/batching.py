"""Batches of encoded examples: length-grouped index batches (little padding) and collation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .encode import IGNORE_INDEX, Encoded


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    group_size: int = 64,
) -> list[list[int]]:
    """Index batches in which examples of similar length go together, to minimise padding.

    With `shuffle`, the indices are shuffled, cut into groups of `group_size * batch_size`, each
    group is sorted by length (longest first) and cut into batches, and the batch order is
    shuffled: a function of (seed, epoch) only, so a resumed run can skip to batch k of epoch e.
    Without `shuffle` (evaluation), all indices are sorted by length, longest first, so an
    out-of-memory batch shows up at once. Every index appears exactly once; the last partial
    batch is kept.
    """
    if batch_size < 1 or group_size < 1:
        raise ConfigError(f"batch_size and group_size must be >= 1, got {batch_size} and {group_size}")
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
    sizes = np.asarray(lengths, dtype=np.int64)
    if not shuffle:
        order = np.argsort(-sizes, kind="stable")
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(sizes))
    chunk = group_size * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        group = order[start : start + chunk]
        group = group[np.argsort(-sizes[group], kind="stable")]
        batches += [group[i : i + batch_size].tolist() for i in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(
    batch: Sequence[Encoded], pad_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (IGNORE_INDEX on padding), each (B, T)."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(e) for e in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(batch):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The fraction of tokens in the padded batches that are padding (0.0 = none)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max((lengths[i] for i in batch), default=0) for batch in batches)
    return 1.0 - real / padded if padded else 0.0
