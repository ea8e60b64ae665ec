"""Adapters in fixed slots: every served linear layer keeps each resident adapter's tensors at one
index of a preallocated bank, so a step routes each token by a slot number and loading or evicting
an adapter writes one slot, never restacks the others.

    y = (W·(x ⊙ in_scale[s]) + B[s]·A[s]·x) ⊙ out_scale[s] + bias ⊙ bias_scale[s]     (s: the token's slot)

LoRA and rsLoRA fill A and B (scaling folded into B), DoRA adds its per-output factor as out_scale,
IA³ fills in_scale (feedforward layers) or out_scale and bias_scale: one path for all of them
(`MethodSpec.slot_tensors`). Slot `capacity` is the base model: zeros and ones, never written.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .types import AdapterLoadError


@dataclass
class Routing:
    """Which slot each token of one engine step uses; shared by every served layer of the step.

    The step's tokens are `decode` decode tokens (one per running sequence) followed by at most one
    prefill chunk of a single sequence (slot `prefill_slot`)."""

    slots: Tensor  # (N,) long: each token's slot
    decode: int
    prefill_slot: int | None
    uniform: int | None  # the slot every token shares, if they do
    lo: int = 0  # decode tokens' slots lie in [lo, hi): the banks' rows read as one view
    hi: int = 0
    onehot: Tensor | None = None  # (decode, hi - lo, 1): each decode token's slot within [lo, hi)

    @classmethod
    def build(
        cls,
        decode_slots: list[int],
        prefill_slot: int | None,
        chunk: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> Routing:
        slots = torch.tensor(decode_slots + [prefill_slot] * chunk, dtype=torch.long)
        distinct = set(decode_slots) | ({prefill_slot} if chunk else set())
        uniform = next(iter(distinct)) if len(distinct) == 1 else None
        rt = cls(slots.to(device), len(decode_slots), prefill_slot if chunk else None, uniform)
        if decode_slots and uniform is None:
            rt.lo, rt.hi = min(decode_slots), max(decode_slots) + 1
            onehot = F.one_hot(slots[: rt.decode] - rt.lo, rt.hi - rt.lo)
            rt.onehot = onehot.to(device=device, dtype=dtype)[:, :, None]
        return rt


class ServedLinear(nn.Module):
    """A base nn.Linear plus the banks of its adapters' slot tensors (allocated on first use)."""

    def __init__(self, base: nn.Linear, capacity: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.capacity, self.max_rank = capacity, max_rank
        self.out_features, self.in_features = base.weight.shape
        self.banks: dict[
            str, Tensor
        ] = {}  # A (S+1, R, in), Bt (S+1, R, out), in_scale, out_scale, bias_scale

    def _bank(self, role: str) -> Tensor:
        if role not in self.banks:
            w = self.base.weight
            rows = self.capacity + 1
            shape = {
                "A": (rows, self.max_rank, self.in_features),
                "Bt": (rows, self.max_rank, self.out_features),
                "in_scale": (rows, self.in_features),
            }.get(role, (rows, self.out_features))
            fill = torch.zeros if role in ("A", "Bt") else torch.ones
            self.banks[role] = fill(shape, dtype=w.dtype, device=w.device)
        return self.banks[role]

    def check(self, tensors: dict[str, Tensor], where: str) -> None:
        """Refuse what does not fit a slot, before anything is written."""
        if "A" in tensors and tensors["A"].shape[0] > self.max_rank:
            raise AdapterLoadError(
                f"{where}: rank {tensors['A'].shape[0]} is over the server's max_rank {self.max_rank}; "
                "start the server with a larger max_rank"
            )

    def write(self, slot: int, tensors: dict[str, Tensor]) -> None:
        """Put one adapter's tensors at `slot` (roles it lacks are reset to 'no effect')."""
        self.clear(slot)
        for role, value in tensors.items():
            if role == "A":
                self._bank("A")[slot, : value.shape[0]] = value
            elif role == "B":
                self._bank("Bt")[slot, : value.shape[1]] = value.T
            else:
                self._bank(role)[slot] = value

    def clear(self, slot: int) -> None:
        for role, bank in self.banks.items():
            bank[slot] = 0 if role in ("A", "Bt") else 1

    def forward(self, x: Tensor, rt: Routing) -> Tensor:  # x: (N, in)
        if not self.banks or rt.uniform == self.capacity:
            return self.base(x)
        xs = x * self.banks["in_scale"].index_select(0, rt.slots) if "in_scale" in self.banks else x
        return self.finish(x, F.linear(xs, self.base.weight), rt)

    def finish(self, x: Tensor, y: Tensor, rt: Routing) -> Tensor:
        """The layer's output from its base product y = W·x (no bias yet; (N, out)): adapters and bias."""
        banks, slots, bias = self.banks, rt.slots, self.base.bias
        if not banks or rt.uniform == self.capacity:
            return y if bias is None else y + bias
        if "A" in banks:
            y = y + self._low_rank(x, rt)
        if "out_scale" in banks:
            y = y * banks["out_scale"].index_select(0, slots)
        if bias is not None:
            y = y + (bias * banks["bias_scale"].index_select(0, slots) if "bias_scale" in banks else bias)
        return y

    def _low_rank(self, x: Tensor, rt: Routing) -> Tensor:
        a, bt = self.banks["A"], self.banks["Bt"]  # (S+1, R, in), (S+1, R, out)
        if rt.uniform is not None:
            return (x @ a[rt.uniform].T) @ bt[rt.uniform]
        parts = []
        if rt.decode:
            # Every decode token against the adapters of the slot range (one view, no copy), then keep
            # only its own slot's R columns: (d, U·R) -> masked -> (d, out).
            width = rt.hi - rt.lo
            h = x[: rt.decode] @ a[rt.lo : rt.hi].reshape(width * self.max_rank, -1).T
            h = (h.view(rt.decode, width, self.max_rank) * rt.onehot).view(rt.decode, -1)
            parts.append(h @ bt[rt.lo : rt.hi].reshape(width * self.max_rank, -1))
        if rt.prefill_slot is not None:
            u = rt.prefill_slot
            parts.append((x[rt.decode :] @ a[u].T) @ bt[u])
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class FusedLinears:
    """Linears that read the same input (q/k/v, gate/up) as one matrix product: their weights become
    views into one concatenated matrix (no extra memory), and each adds its own adapters after."""

    def __init__(self, linears: list[ServedLinear]) -> None:
        self.linears = linears
        weights = [lin.base.weight for lin in linears]
        self.weight = torch.cat([w.detach() for w in weights])  # (sum out, in)
        start = 0
        for lin, w in zip(linears, weights, strict=True):
            lin.base.weight.data = self.weight[start : start + w.shape[0]]  # the same memory, shared
            start += w.shape[0]
        self.sizes = [w.shape[0] for w in weights]

    def __call__(self, x: Tensor, rt: Routing) -> list[Tensor]:
        if any("in_scale" in lin.banks for lin in self.linears):  # IA³ scales this input: one by one
            return [lin(x, rt) for lin in self.linears]
        y = F.linear(x, self.weight)  # (N, sum out)
        return [
            lin.finish(x, part, rt) for lin, part in zip(self.linears, y.split(self.sizes, -1), strict=True)
        ]


class SlotTable:
    """Which adapter key holds which slot, least recently used first; a slot whose adapter has
    requests (running or waiting) is never evicted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[str, int] = OrderedDict()  # key -> slot, LRU first
        self.refs: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        slot = self.keys.get(key)
        if slot is not None:
            self.keys.move_to_end(key)
        return slot

    def take(self) -> tuple[int, str | None] | None:
        """A slot for a new adapter: the lowest free one, else the least recently used idle one
        (its key, evicted, returned too); None when every slot is busy."""
        used = set(self.keys.values())
        for slot in range(self.capacity):
            if slot not in used:
                return slot, None
        for key, slot in self.keys.items():
            if self.refs.get(key, 0) == 0:
                del self.keys[key]
                return slot, key
        return None

    def put(self, key: str, slot: int) -> None:
        self.keys[key] = slot

    def drop(self, key: str) -> int | None:
        return self.keys.pop(key, None)
