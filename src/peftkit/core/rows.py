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

from ..errors import RequestError

BASE = "base"
"""The one name for "no adapter": a mixed batch's base-model rows, eval's base-model results. No adapter
may take it. In `adapter_names`, None and HF PEFT's spelling "__base__" mean the same."""
BASE_NAMES = (None, BASE, "__base__")

_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class Weighted:
    """A weighted set of adapters for one row or for the whole model: output = base + Σ w·Δ.

    Made (and checked) by `peftkit.core.weights`. Equal and hashed as a set, whatever the order of its
    items ({"a": 0.7, "b": 0.3} is {"b": 0.3, "a": 0.7}), so generate's beams can compare rows."""

    items: tuple[tuple[str, float], ...]  # (adapter name, weight), each name once

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Weighted):
            return NotImplemented
        return dict(self.items) == dict(other.items)

    def __hash__(self) -> int:
        return hash(frozenset(self.items))

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{n!r}: {w:g}" for n, w in self.items) + "}"


RowChoice = str | Weighted | None
"""What one row of a mixed batch runs through: an adapter, a weighted set, or (None) the base model."""


@dataclass
class RowRouting:
    """Per-row adapter choice for one mixed batch.

    `unique` lists the distinct adapter names in the batch; `row_to_unique[i]` indexes it, and
    rows that use the base model point one past the end (`len(unique)`). Weighted rows (a `Weighted`
    set) point there too, so methods that cannot weight see them as base rows (a weighted set holds
    only adapters that can be weighted); their weights are in `weights`.
    """

    names: tuple[str | None, ...]  # the plain adapter per row; None for base and weighted rows
    unique: tuple[str, ...]
    row_to_unique: Tensor  # (N,) long, on CPU; layers move it to their device once
    uid: int = field(default_factory=lambda: next(_ids))
    expand: int = 1
    """How many copies of each row a layer may also see: `generate` repeats every prompt for its
    beams or returned sequences (max(num_beams, num_return_sequences)) after the encoder has run."""
    weights: Tensor | None = None
    """(N, len(unique)) float32 on CPU, each row's weight per adapter (plain rows one-hot, base rows
    zero); None when no row is weighted, so plain batches keep their one-slot-per-row path."""

    @classmethod
    def from_names(cls, names: list[RowChoice] | tuple[RowChoice, ...], expand: int = 1) -> RowRouting:
        clean = tuple(None if isinstance(n, str | None) and n in BASE_NAMES else n for n in names)
        plain = tuple(n if isinstance(n, str) else None for n in clean)
        unique = tuple(dict.fromkeys(a for n in clean for a, _ in _pairs(n)))
        pos = {n: i for i, n in enumerate(unique)}
        idx = torch.tensor([pos[n] if n is not None else len(unique) for n in plain], dtype=torch.long)
        weights = None
        if any(isinstance(n, Weighted) for n in clean):
            weights = torch.zeros(len(clean), len(unique))
            for row, n in enumerate(clean):
                for a, w in _pairs(n):
                    weights[row, pos[a]] = w
        return cls(names=plain, unique=unique, row_to_unique=idx, expand=expand, weights=weights)

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
        """The one adapter (or None for base) every row uses, or False when rows differ (or are weighted)."""
        if self.weights is not None:
            return False
        first = self.names[0] if self.names else None
        return first if all(n == first for n in self.names) else False


def _pairs(choice: RowChoice) -> tuple[tuple[str, float], ...]:
    """A row's (adapter, weight) pairs: a plain adapter has weight 1, the base model none."""
    if isinstance(choice, Weighted):
        return choice.items
    return () if choice is None else ((choice, 1.0),)


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


def row_weights(
    routing: RowRouting, names: list[str], batch: Tensor, cache: dict[str, tuple[tuple, object]]
) -> tuple[Tensor, list[int]]:
    """Each row's weight per adapter of a layer whose adapters are `names` (in stack order): (N, len(names))
    on the batch's device, and the slots some row uses (so a layer skips the others without asking
    the device). Needs `routing.weights`; cached like `row_slots`."""
    assert routing.weights is not None
    key = (routing.uid, batch.device, batch.shape[0], torch.is_inference_mode_enabled())
    hit = cache.get("weights")
    if hit is not None and hit[0] == key:
        return hit[1]  # type: ignore[return-value]
    index = {n: i for i, n in enumerate(names)}
    lut = torch.tensor([index.get(u, len(index)) for u in routing.unique], dtype=torch.long)
    per_slot = torch.zeros(routing.weights.shape[0], len(names) + 1).index_add_(1, lut, routing.weights)
    per_slot = per_slot[:, : len(names)].repeat_interleave(routing.repeat_for(batch.shape[0]), dim=0)
    used = [s for s in range(len(names)) if bool(per_slot[:, s].any())]
    value = (per_slot.to(batch.device), used)
    cache["weights"] = (key, value)
    return value


class AdapterState:
    """Shared by all adapter layers of one model: what is active (with which weights), disabled or
    routed right now."""

    def __init__(self) -> None:
        self._active: tuple[str, ...] = ()
        self.weights: dict[str, float] = {}  # active adapters whose weight is not 1
        self.disabled = False
        self.rows: RowRouting | None = None

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    @active.setter
    def active(self, names: tuple[str, ...]) -> None:
        # An adapter that stops being active loses its weight: one deleted and added again starts at 1.
        self._active = tuple(names)
        self.weights = {n: w for n, w in self.weights.items() if n in self._active}

    def activate(self, names: tuple[str, ...], weights: dict[str, float]) -> None:
        """Make `names` active, with `weights` for those whose weight is not 1."""
        self.active = names
        self.weights = {n: float(w) for n, w in weights.items() if n in names and w != 1}

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)


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
