"""One engine step's inputs, written into buffers allocated once for the engine's largest step.

A step is `d` decode tokens (one per running sequence, in running order) followed by prefill chunks
(a run of one sequence's prompt tokens each). Its token ids, positions, slots and cache rows, the
decode tokens' rows and lengths and the tokens to sample are written into one host buffer (pinned
on a GPU) and copied to the device in one transfer; the facts the layers branch on (slot ranges,
which rows decode, chunk bounds) are host integers. So the forward reads device tensors and Python
ints only, and no layer waits on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .slots import StepSlots


class Running(Protocol):
    """What a step reads of a running sequence (the scheduler's `Sequence`)."""

    prompt: list[int]
    output: list[int]
    row: int | None
    slot: int | None
    cached: int  # tokens in the cache
    start: int  # the prompt's first position


@dataclass
class Chunk:
    """`length` prompt tokens of the sequence in cache row `row`, from position `start`; they are
    the step's tokens [offset, offset + length). `mask` (length, start + length): causal, boolean."""

    row: int
    start: int
    length: int
    offset: int
    mask: Tensor


@dataclass
class Decode:
    """The decode tokens as attention reads the cache: the rows [lo, lo + count) they span, each of
    them `span` positions at most; a row without a decode token sees its position 0 only (its result
    is dropped). `in_order`: every row of the span decodes, in row order (the common case)."""

    tokens: int  # d
    lo: int
    count: int
    span: int
    in_order: bool
    within: Tensor  # (d,) long: each decode token's row - lo
    mask: Tensor  # (count, 1, 1, span) fp32: 0 where a row's keys are, -inf past them


@dataclass
class Step:
    ids: Tensor  # (N,) long
    positions: Tensor  # (N,) long
    rows: Tensor  # (N,) long: each token's cache row
    last: Tensor  # (M,) long: the tokens whose logits are sampled (decode tokens, then finished prompts)
    slots: StepSlots
    decode: Decode | None
    prefill: list[Chunk]
    finishing: list[int]  # the prefill chunks (indices) that end their prompt: sampled after the decodes

    @property
    def chunk(self) -> int:
        return sum(c.length for c in self.prefill)


FIELDS = ("ids", "positions", "slots", "rows")  # per token
ROW_FIELDS = ("span_lens", "last", "slot_index")  # per sequence


class StepBuffers:
    """Host and device buffers for steps of at most `tokens` tokens over at most `rows` sequences,
    with `capacity` adapter slots (slot `capacity` is the base model's) and positions below `max_len`."""

    def __init__(self, tokens: int, rows: int, capacity: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:  # fmt: skip
        self.base, self.dtype, self.device = capacity, dtype, torch.device(device)
        sizes = {**dict.fromkeys(FIELDS, tokens), **dict.fromkeys(ROW_FIELDS, rows)}
        self.at, start = {}, 0
        for name, size in sizes.items():
            self.at[name] = start
            start += size
        gpu = self.device.type == "cuda"
        self.host = torch.zeros(start, dtype=torch.long, pin_memory=gpu)  # (all fields,)
        on_host = self.device.type == "cpu"
        self.device_buf = self.host if on_host else torch.empty_like(self.host, device=device)
        self.np = {name: self.host.numpy()[i : i + sizes[name]] for name, i in self.at.items()}
        self.copied: torch.cuda.Event | None = None  # the last host -> device copy (a GPU only)
        self.arange = torch.arange(max(max_len, capacity + 1), device=device)  # (max_len,)

    def fill(self, decode: Sequence[Running], prefill: Sequence[tuple[Running, int]]) -> Step:
        """The step that decodes one token of each of `decode` and reads `n` prompt tokens of each
        (sequence, n) of `prefill`, as of the sequences' state now (before the step)."""
        if self.copied is not None:  # a step that sampled nothing waited for nothing: the previous
            self.copied.synchronize()  # copy may still be queued, and it reads the host buffer
        h, d = self.np, len(decode)
        cached = [s.cached for s in decode]
        drows = [s.row for s in decode]
        dslots = [s.slot for s in decode]
        h["ids"][:d] = [s.output[-1] for s in decode]
        h["positions"][:d], h["rows"][:d], h["slots"][:d] = cached, drows, dslots
        h["last"][:d] = self.arange_np(d)
        chunks, finishing, offset, m = [], [], d, d
        for i, (seq, n) in enumerate(prefill):
            read = seq.cached - seq.start
            h["ids"][offset : offset + n] = seq.prompt[read : read + n]
            h["positions"][offset : offset + n] = self.arange_np(n) + seq.cached
            h["rows"][offset : offset + n], h["slots"][offset : offset + n] = seq.row, seq.slot
            chunks.append((seq.row, seq.cached, n, offset, seq.slot))
            offset += n
            if seq.cached + n == seq.start + len(seq.prompt):  # its prompt is read: its first token now
                h["last"][m], m = offset - 1, m + 1
                finishing.append(i)
        facts = self._decode_facts(drows, cached) if d else None
        if facts is not None:
            h["span_lens"][: facts[1]] = facts[4]
        slot_facts = self._slot_facts(dslots, [c[4] for c in chunks])
        if self.device_buf is not self.host:  # one transfer, waited for before the next fill
            self.device_buf.copy_(self.host, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        return Step(
            self._view("ids", offset), self._view("positions", offset), self._view("rows", offset),
            self._view("last", m), self._step_slots(offset, d, dslots[0] if d else None, chunks, *slot_facts),
            self._decode(d, facts), [self._chunk(*c[:4]) for c in chunks], finishing,
        )  # fmt: skip

    def arange_np(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    def _view(self, name: str, n: int) -> Tensor:
        return self.device_buf[self.at[name] : self.at[name] + n]

    @staticmethod
    def _decode_facts(rows: list[int], cached: list[int]) -> tuple[int, int, int, bool, np.ndarray]:
        """(lo, count, span, in_order, each spanned row's sequence length) for the decode tokens."""
        lo, count = min(rows), max(rows) + 1 - min(rows)
        lens = np.ones(count, dtype=np.int64)  # (count,): a row without a decode token sees position 0
        lens[np.asarray(rows) - lo] = np.asarray(cached) + 1  # its length with this step's token
        in_order = len(rows) == count and rows == list(range(lo, lo + count))
        return lo, count, max(cached) + 1, in_order, lens

    def _decode(self, d: int, facts: tuple | None) -> Decode | None:
        if facts is None:
            return None
        lo, count, span, in_order, _ = facts
        hidden = self.arange[:span] >= self._view("span_lens", count)[:, None]  # (count, span)
        mask = torch.zeros(hidden.shape, dtype=torch.float32, device=self.device)  # (count, span)
        mask.masked_fill_(hidden, float("-inf"))
        within = self._view("rows", d) - lo  # (d,)
        return Decode(d, lo, count, span, in_order, within, mask[:, None, None])

    def _chunk(self, row: int, start: int, length: int, offset: int) -> Chunk:
        query = self.arange[start : start + length]  # (length,): the chunk's positions
        mask = self.arange[: start + length][None] <= query[:, None]  # (length, start + length)
        return Chunk(row, start, length, offset, mask)

    def _slot_facts(self, decode: list[int], chunks: list[int]) -> tuple[int | None, int, int]:
        """(the slot every token shares or None, the adapters' slot range [lo, hi) of the decode
        tokens): the base model's slot adds nothing, so it stays out of the range."""
        distinct = set(decode) | set(chunks)
        uniform = next(iter(distinct)) if len(distinct) == 1 else None
        adapted = [s for s in decode if s != self.base]
        if not adapted or uniform is not None:
            return uniform, 0, 0
        lo = min(adapted)
        self.np["slot_index"][: len(decode)] = [s - lo if s != self.base else -1 for s in decode]
        return uniform, lo, max(adapted) + 1

    def _step_slots(self, n: int, d: int, first: int | None, chunks: list[tuple], uniform: int | None,
                    lo: int, hi: int) -> StepSlots:  # fmt: skip
        rt = StepSlots(
            self._view("slots", n), d, [(c[3], c[2], c[4]) for c in chunks], uniform, first, lo, hi
        )
        if hi > lo:  # (d, hi - lo, 1): a base token's row is all zeros
            onehot = self._view("slot_index", d)[:, None] == self.arange[: hi - lo]
            rt.onehot = onehot.to(self.dtype)[:, :, None]
        return rt
