"""Adapters in fixed slots: every served linear layer keeps each resident adapter's tensors at one
index of a preallocated bank, so a step routes each token by a slot number and loading or evicting
an adapter writes one slot, never restacks the others.

    y = (W·(x ⊙ in_scale[s]) + B[s]·A[s]·x) ⊙ out_scale[s] + bias ⊙ bias_scale[s]     (s: the token's slot)

The roles of that algebra and their shapes are data (`SLOT_ROLES`); a method declares the roles its
slot tensors use (`MethodSpec.slot_roles`) and is served if the engine holds them all: LoRA and rsLoRA
fill A and B (scaling folded into B), DoRA adds its per-output factor as out_scale, IA³ fills in_scale
(feedforward layers) or out_scale and bias_scale. Slot `capacity` is the base model: never written.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .types import AdapterLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotRole:
    """One tensor of the slot algebra: its shape over "r" (the adapter's rank), "in" and "out" (the
    layer's features), the value that means "no effect" (what an empty slot holds), and its bank."""

    dims: tuple[str, ...]
    empty: float  # 0 for a low-rank factor (adds nothing), 1 for a scale (keeps the value)
    bank: str  # the bank that holds it; a bank named otherwise holds it transposed


SLOT_ROLES: dict[str, SlotRole] = {
    "A": SlotRole(("r", "in"), 0.0, "A"),
    "B": SlotRole(("out", "r"), 0.0, "Bt"),  # held as Bt (r, out): a slot's leading rows are its rank
    "in_scale": SlotRole(("in",), 1.0, "in_scale"),
    "out_scale": SlotRole(("out",), 1.0, "out_scale"),
    "bias_scale": SlotRole(("out",), 1.0, "bias_scale"),
}
# bank name -> (its dims in one slot, its empty value)
BANKS: dict[str, tuple[tuple[str, ...], float]] = {
    r.bank: (r.dims if r.bank == name else r.dims[::-1], r.empty) for name, r in SLOT_ROLES.items()
}


def check_servable(key: str, spec: Any) -> None:
    """Refuse a layer method by capability: one whose spec declares no slot roles (or gives no slot
    tensors), or roles the engine's banks do not hold. A method that fits needs no engine change."""
    roles = spec.slot_roles if spec.slot_tensors is not None else None
    if roles is None:
        raise AdapterLoadError(f"adapter {key!r} is {spec.label}, which the server does not serve yet")
    missing = sorted(set(roles) - SLOT_ROLES.keys())
    if missing:
        raise AdapterLoadError(
            f"adapter {key!r} is {spec.label}, whose slot tensors ({', '.join(missing)}) the server's "
            "engine does not hold; the server does not serve it yet"
        )


@dataclass
class StepSlots:
    """Which slot each token of one engine step uses; shared by every served layer of the step.

    The step's tokens are `decode` decode tokens (one per running sequence) followed by prefill
    chunks, each (offset, length, slot): a run of one sequence's prompt tokens. Everything but the
    tensors is a host value, so the layers branch on it without waiting for a device."""

    slots: Tensor  # (N,) long: each token's slot
    decode: int
    prefill: list[tuple[int, int, int]]
    uniform: int | None  # the slot every token shares, if they do
    first: int | None  # the first decode token's slot (read when it is the only one), None without one
    lo: int = 0  # decode tokens' slots lie in [lo, hi): the banks' rows read as one view
    hi: int = 0
    onehot: Tensor | None = None  # (decode, hi - lo, 1): each decode token's slot within [lo, hi)


def packed_product(weight: Tensor) -> Callable[[Tensor], Tensor]:
    """x -> x·Wᵀ (no bias) for a weight that never changes. On CPU in bf16 or fp16 it runs on a copy
    of W that oneDNN has laid out for its kernels once, instead of on every call: about 1.6x faster
    for a decode step's few rows, and bit-identical to F.linear (checked here, else F.linear). fp32
    keeps F.linear: oneDNN's fp32 products round differently from it, and fp32 serving is exact."""
    plain = partial(F.linear, weight=weight)
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return plain
    try:
        packed = mkldnn._reorder_linear_weight(weight.detach(), 16)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        if not torch.equal(mkldnn._linear_pointwise(probe, packed, None, "none", [], ""), plain(probe)):
            return plain
    except (AttributeError, RuntimeError):  # no oneDNN in this build, or a dtype it lacks
        return plain
    return lambda x: mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class ServedLinear(nn.Module):
    """A base nn.Linear plus the banks of its adapters' slot tensors (allocated on first use)."""

    def __init__(self, base: nn.Linear, capacity: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.capacity, self.max_rank = capacity, max_rank
        self.out_features, self.in_features = base.weight.shape
        # A (S+1, R, in), Bt (S+1, R, out), in_scale, out_scale, bias_scale: allocated on first use
        self.banks: dict[str, Tensor] = {}  # by bank name (BANKS)
        self.fused: FusedLinears | None = None  # set when this layer's A and B live in a fused bank
        self.product = partial(F.linear, weight=base.weight)  # x -> W·x; `pack()` makes it faster

    def pack(self) -> None:
        self.product = packed_product(self.base.weight)

    def _bank(self, name: str) -> Tensor:
        if name in ("A", "Bt") and self.fused is not None:
            self.fused.allocate()  # views into the fused banks, for every linear of the group
        if name not in self.banks:
            w = self.base.weight
            dims, empty = BANKS[name]
            shape = (self.capacity + 1, *(self._size[d] for d in dims))
            self.banks[name] = torch.full(shape, empty, dtype=w.dtype, device=w.device)
        return self.banks[name]

    @property
    def _size(self) -> dict[str, int]:
        return {"r": self.max_rank, "in": self.in_features, "out": self.out_features}

    def check(self, tensors: dict[str, Tensor], where: str) -> None:
        """Refuse what does not fit a slot, before anything is written. `tensors` are by bank (B as
        Bt)."""
        for name, value in tensors.items():
            if name not in BANKS:
                raise AdapterLoadError(
                    f"{where}: the engine holds no slot tensor {name!r} (it holds {', '.join(SLOT_ROLES)})"
                )
            dims = BANKS[name][0]
            if dims[0] == "r" and value.shape[0] > self.max_rank:
                raise AdapterLoadError(
                    f"{where}: rank {value.shape[0]} is over the server's max_rank {self.max_rank}; "
                    "start the server with a larger max_rank"
                )
            want = tuple(value.shape[0] if d == "r" else self._size[d] for d in dims)
            if tuple(value.shape) != want:
                raise AdapterLoadError(
                    f"{where}: {name} has shape {tuple(value.shape)}, the layer takes {want}"
                )

    def write(self, slot: int, tensors: dict[str, Tensor]) -> None:
        """Put one adapter's tensors at `slot` (roles it lacks are reset to 'no effect'); keys are
        roles of SLOT_ROLES or bank names (Bt: B already transposed)."""
        self.clear(slot)
        for name, value in tensors.items():
            role = SLOT_ROLES.get(name)
            if role is not None and role.bank != name:
                name, value = role.bank, value.T
            bank = self._bank(name)
            if BANKS[name][0][0] == "r":  # the adapter's rank fills the slot's leading rows
                bank[slot, : value.shape[0]] = value
            else:
                bank[slot] = value

    def clear(self, slot: int) -> None:
        for name, bank in self.banks.items():
            bank[slot] = BANKS[name][1]

    def forward(self, x: Tensor, rt: StepSlots) -> Tensor:  # x: (N, in)
        xs = x * self.banks["in_scale"].index_select(0, rt.slots) if "in_scale" in self.banks else x
        return self.finish(x, self.product(xs), rt)

    def finish(self, x: Tensor, y: Tensor, rt: StepSlots, low_rank: bool = True) -> Tensor:
        """The layer's output from its base product y = W·x (no bias yet; (N, out)): adapters and bias
        (`low_rank=False`: B·A·x is in y already, added for the whole fused group)."""
        banks, slots, bias = self.banks, rt.slots, self.base.bias
        if not banks or rt.uniform == self.capacity:
            return y if bias is None else y + bias
        if low_rank and "A" in banks:
            y = add_low_rank(y, x, banks["A"], banks["Bt"], rt)
        if "out_scale" in banks:
            y = y * banks["out_scale"].index_select(0, slots)
        if bias is not None:
            y = y + (bias * banks["bias_scale"].index_select(0, slots) if "bias_scale" in banks else bias)
        return y


DENSE_WIDTH = 12  # slot ranges up to this wide take the dense path in mixed decode steps


def add_low_rank(y: Tensor, x: Tensor, a: Tensor, bt: Tensor, rt: StepSlots) -> Tensor:
    """y += B[s]·A[s]·x for each token's slot s, in place (y is the step's own product);
    x (N, in), a (S+1, R, in), bt (S+1, R, out), y (N, out). The base model's slot adds nothing."""
    base = a.shape[0] - 1
    if rt.uniform is not None:
        return y.addmm_(x @ a[rt.uniform].T, bt[rt.uniform]) if rt.uniform != base else y
    d = rt.decode
    if d == 1:  # one decode token: its own slot's factors (and no size-1 kernel to compile)
        if rt.first != base:
            y[:1].addmm_(x[:1] @ a[rt.first].T, bt[rt.first])
    elif rt.hi > rt.lo:  # decode tokens of several slots, some of them adapters'
        # A narrow slot range is cheaper as dense products over it than through the per-token
        # kernel, whose cost does not depend on the range (measured on the built-in model in bf16:
        # even at about 12 slots wide).
        delta = GATHERED(x[:d], a, bt, rt.slots[:d]) if rt.hi - rt.lo > DENSE_WIDTH else None
        if delta is None:
            # Every decode token against the adapters of the slot range (one view, no copy), then
            # keep only its own slot's R columns: (d, U·R) -> masked -> (d, out).
            width, rank = rt.hi - rt.lo, a.shape[1]
            h = x[:d] @ a[rt.lo : rt.hi].reshape(width * rank, -1).T
            h = (h.view(d, width, rank) * rt.onehot).view(d, -1)
            delta = h @ bt[rt.lo : rt.hi].reshape(width * rank, -1)
        y[:d] += delta
    for offset, length, u in rt.prefill:  # one sequence's run: its slot's factors, no gather
        if u != base:
            y[offset : offset + length].addmm_(x[offset : offset + length] @ a[u].T, bt[u])
    return y


def _gathered(x: Tensor, a: Tensor, bt: Tensor, slots: Tensor) -> Tensor:
    h = (x[:, None].float() * a[slots].float()).sum(-1)  # (d, R): each token against its own A
    return (h[:, :, None] * bt[slots].float()).sum(1).to(x.dtype)  # (d, out)


class GatheredKernel:
    """B[s]·A[s]·x with each token reading only its own slot's factors, in fp32: what Punica and
    S-LoRA call BGMV. Eagerly the gathers would copy every token's factors; compiled, they fuse
    into the two reductions, which makes a mixed step's adapters cost the same for 13 adapters as
    for 2 (the dense alternative multiplies every token by every slot in the range and masks).

    Compiled once per process on first use (a few seconds; `warm` does it ahead). Where torch
    cannot compile (no C++ compiler), calls return None and the caller takes the dense path."""

    def __init__(self) -> None:
        self.fn: Callable[..., Tensor] | None = None
        self.failed: str | None = None

    def __call__(self, x: Tensor, a: Tensor, bt: Tensor, slots: Tensor) -> Tensor | None:
        if self.failed is not None:
            return None
        fn = self.fn or torch.compile(_gathered, dynamic=True)
        try:  # the first call compiles; a call with new kinds of input (a dtype, strides) recompiles
            out = fn(x, a, bt, slots)
        except Exception as error:  # noqa: BLE001 (inductor raises many types; the dense path works)
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("mixed-adapter kernel did not compile (%s); using the dense path", self.failed)
            return None
        self.fn = fn
        return out

    def warm(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Compile now for this dtype and device, not on the first mixed step."""
        x = torch.zeros(3, 8, dtype=dtype, device=device)
        a, bt = (
            torch.zeros(4, 2, 8, dtype=dtype, device=device),
            torch.zeros(4, 2, 5, dtype=dtype, device=device),
        )
        with torch.inference_mode():  # as the engine steps
            self(x, a, bt, torch.tensor([0, 2, 1], device=device))


GATHERED = GatheredKernel()


class FusedLinears:
    """Linears that read the same input (q/k/v, gate/up) as one matrix product: their weights become
    views into one concatenated matrix (no extra memory). Their LoRA factors live in fused banks too
    (A stacked, Bᵀ block-diagonal), so B·A·x for the whole group is two products, not two per linear;
    each linear's own banks are views into them, written as before."""

    def __init__(self, linears: list[ServedLinear]) -> None:
        self.linears = linears
        weights = [lin.base.weight for lin in linears]
        self.weight = torch.cat([w.detach() for w in weights])  # (sum out, in)
        start = 0
        for lin, w in zip(linears, weights, strict=True):
            lin.base.weight.data = self.weight[start : start + w.shape[0]]  # the same memory, shared
            lin.fused = self
            start += w.shape[0]
        self.sizes = [w.shape[0] for w in weights]
        self.product = packed_product(self.weight)
        self.a: Tensor | None = None  # (S+1, n·R, in)
        self.bt: Tensor | None = None  # (S+1, n·R, sum out), block-diagonal

    def allocate(self) -> None:
        if self.a is not None:
            return
        first, w = self.linears[0], self.weight
        rows, rank, n = first.capacity + 1, first.max_rank, len(self.linears)
        self.a = torch.zeros(rows, n * rank, w.shape[1], dtype=w.dtype, device=w.device)
        self.bt = torch.zeros(rows, n * rank, w.shape[0], dtype=w.dtype, device=w.device)
        start = 0
        for i, (lin, size) in enumerate(zip(self.linears, self.sizes, strict=True)):
            lin.banks["A"] = self.a[:, i * rank : (i + 1) * rank]
            lin.banks["Bt"] = self.bt[:, i * rank : (i + 1) * rank, start : start + size]
            start += size

    def __call__(self, x: Tensor, rt: StepSlots) -> list[Tensor]:
        if any("in_scale" in lin.banks for lin in self.linears):  # IA³ scales this input: one by one
            return [lin(x, rt) for lin in self.linears]
        y = self.product(x)  # (N, sum out)
        if self.a is not None and rt.uniform != self.linears[0].capacity:
            y = add_low_rank(y, x, self.a, self.bt, rt)
        parts = y.split(self.sizes, -1)
        return [
            lin.finish(x, part, rt, low_rank=False) for lin, part in zip(self.linears, parts, strict=True)
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
