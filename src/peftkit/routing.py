"""Which adapters a forward pass uses: the state every adapter layer of one model shares.

An `AdaptedModel` owns one `AdapterState`; each adapter layer holds a reference to it, so switching
the active adapter or routing a mixed batch is one assignment, not a walk over the layers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import RequestError

BASE = "base"
"""The one name for "no adapter": a mixed batch's base-model rows, eval's base-model results. No adapter
may take it. In `adapter_names`, None and HF PEFT's spelling "__base__" mean the same."""
BASE_NAMES = (None, BASE, "__base__")

_ids = itertools.count()


@dataclass
class RowRouting:
    """Per-row adapter choice for one mixed batch.

    `unique` lists the distinct adapter names in the batch; `row_to_unique[i]` indexes it, and
    rows that use the base model point one past the end (`len(unique)`).
    """

    names: tuple[str | None, ...]
    unique: tuple[str, ...]
    row_to_unique: Tensor  # (N,) long, on CPU; layers move it to their device once
    uid: int = field(default_factory=lambda: next(_ids))
    expand: int = 1
    """How many copies of each row a layer may also see: `generate` repeats every prompt for its
    beams or returned sequences (max(num_beams, num_return_sequences)) after the encoder has run."""

    @classmethod
    def from_names(cls, names: list[str | None] | tuple[str | None, ...], expand: int = 1) -> RowRouting:
        clean = tuple(None if n in BASE_NAMES else n for n in names)
        unique = tuple(dict.fromkeys(n for n in clean if n is not None))
        pos = {n: i for i, n in enumerate(unique)}
        idx = torch.tensor([pos[n] if n is not None else len(unique) for n in clean], dtype=torch.long)
        return cls(names=clean, unique=unique, row_to_unique=idx, expand=expand)

    def repeat_for(self, batch_rows: int) -> int:
        """How many consecutive rows of a batch of `batch_rows` share one entry of `names`: 1, or
        `expand` inside generate's beam search. Any other count is an error, never a guess: a batch
        of 4 rows with 2 names would otherwise route rows 0-1 and 2-3 through the wrong adapters."""
        n = len(self.names)
        if batch_rows == n:
            return 1
        if batch_rows == n * self.expand:
            return self.expand
        fits = f"{n} rows" + (f", or {n * self.expand} in beam search" if self.expand > 1 else "")
        raise RequestError(
            f"a batch of {batch_rows} rows does not fit {n} adapter_names, which are for {fits}; "
            "give one name per row"
        )

    @property
    def single(self) -> str | None | bool:
        """The one adapter (or None for base) every row uses, or False when rows differ."""
        first = self.names[0] if self.names else None
        return first if all(n == first for n in self.names) else False


def row_slots(
    routing: RowRouting, names: list[str], batch: Tensor, cache: dict[str, tuple[tuple, object]]
) -> tuple[Tensor, int | None]:
    """Each row's slot in a layer whose adapters are `names` (in stack order; len(names) means "no
    adapter on this layer"), and the slot every row shares, if they do (else None). Kept in `cache`
    (the layer's) for the routing's lifetime: every forward of one mixed batch reuses it."""
    key = (routing.uid, batch.device, batch.shape[0], torch.is_inference_mode_enabled())
    hit = cache.get("rows")
    if hit is not None and hit[0] == key:
        return hit[1]  # type: ignore[return-value]
    index = {n: i for i, n in enumerate(names)}
    lut = [index.get(u, len(index)) for u in routing.unique] + [len(index)]
    slots = torch.tensor(lut, dtype=torch.long)[routing.row_to_unique]
    slots = slots.repeat_interleave(routing.repeat_for(batch.shape[0]))  # beam search repeats each row
    uniform = int(slots[0]) if bool((slots == slots[0]).all()) else None
    value = (slots.to(batch.device), uniform)
    cache["rows"] = (key, value)
    return value


@dataclass
class AdapterState:
    """Shared by all adapter layers of one model: what is active, disabled or routed right now."""

    active: tuple[str, ...] = ()
    disabled: bool = False
    rows: RowRouting | None = None


def batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The rows of a forward or generate call's batch, from its main input (generate calls it
    `inputs`) or its attention mask; None when the call has no tensor to tell."""
    names = ("input_ids", "inputs_embeds", "inputs", "attention_mask")
    for value in (*(kwargs.get(n) for n in names), *args):
        if isinstance(value, Tensor):
            return value.shape[0]
    return None


def generate_expansion(model: object, kwargs: dict) -> int:
    """How many copies of each row `generate` runs (`RowRouting.expand`): HF expands every prompt to
    max(num_beams, num_return_sequences) rows after the encoder (transformers' generate, step 5)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return max(beams, returns)


def as_kwargs(args: tuple, kwargs: dict[str, Any], first: str = "input_ids") -> dict[str, Any]:
    """A call's arguments as keywords: a positional first argument is the input ids."""
    if not args:
        return kwargs
    if len(args) > 1 or first in kwargs:
        raise RequestError("pass the model's inputs by keyword (input_ids=..., attention_mask=...)")
    return {first: args[0], **kwargs}


def one_name_per_row(names: list[str | None], expand: int) -> list[str | None]:
    """Names given per beam (rows x beams) as one per row. A row's beams share its adapter: beam
    search reorders the beams of a row, so a different adapter per beam would have no meaning."""
    groups = [names[i : i + expand] for i in range(0, len(names), expand)]
    for row, group in enumerate(groups):
        if len(set(group)) > 1:
            raise RequestError(
                f"adapter_names for the {expand} beams of row {row} differ ({group}); a row's beams share "
                "one adapter: give one name per row, or the same name for each of its beams"
            )
    return [group[0] for group in groups]
