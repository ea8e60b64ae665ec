"""The engine's scheduler and step: continuous batching over token ids, many adapters in every step.

Each step decodes one token for every running sequence and reads up to `chunk` prompt tokens of the
sequences still reading theirs (oldest first), so a long prompt never stalls the others and a burst
of short ones is read together.
Sequences join between steps as cache rows free up, and leave when they finish. Each token is routed
to its adapter's slot (slots.py); an adapter a request names is loaded on a worker thread while the
engine keeps stepping, then written into a free slot (or the least recently used idle one).

    core = EngineCore(model, tokenizer, loader, EngineConfig())   # synchronous: tests, benchmarks
    outputs = core.run([(prompt_ids, "bot@3", SamplingParams(temperature=0))])

`engine.Engine` runs a core on its own thread for the HTTP server.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from ..errors import RequestError
from .adapters import AdapterCache, Loader
from .model import ServedModel
from .sampling import sample
from .slots import GATHERED
from .step import StepBuffers
from .types import QueueFullError, SamplingParams, TokenOutput

EVENTS = {
    "step": "one forward: decode (tokens), prefill (tokens), batch (sequences), seconds",
    "admit": "a request starts running: adapter (key or None), queue_seconds",
    "finish": "a request ends: adapter, reason (stop/length/abort/error), prompt_tokens, output_tokens",
    "adapter_hit": "a request's adapter is resident already: adapter",
    "adapter_load": "an adapter was loaded (ok) or failed: adapter, seconds, ok",
    "adapter_evict": "an idle adapter left its slot for another: adapter",
}
__all__ = ["EVENTS", "EngineConfig", "EngineCore", "Loader", "Sequence"]
Sink = Callable[[TokenOutput | Exception], None]


def _setting(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    """How big the engine is: KV cache rows (sequences at once) of `max_len` tokens, and adapter slots.
    Each size is given directly or as a memory budget (MB), which then decides it."""

    max_batch: int = _setting(16, "sequences decoded together: the KV cache's rows")
    max_len: int = _setting(2048, "prompt + output tokens per sequence (an adapter's prefix included)")
    kv_cache_mb: int = _setting(0, "the KV cache's memory in MB; sets max_batch (0: use max_batch)")
    chunk: int = _setting(256, "prompt tokens prefilled per step, beside the running decodes")
    adapter_slots: int = _setting(16, "adapters resident at once; the least recently used idle one goes")
    adapter_cache_mb: int = _setting(
        0, "the adapter slots' memory in MB; sets adapter_slots (0: use adapter_slots)"
    )
    max_rank: int = _setting(16, "the largest LoRA rank an adapter slot holds")
    max_queue: int = _setting(256, "waiting requests before new ones are refused (HTTP 429)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name.endswith("_mb") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise RequestError(
                    f"engine {f.name} must be a whole number of at least {least}, not {value!r}"
                )

    def sized(self, model: nn.Module) -> EngineConfig:
        """This config with max_batch and adapter_slots from the memory budgets, where given."""
        changes = {}
        if self.kv_cache_mb:
            per_row = ServedModel.kv_bytes_per_token(model) * self.max_len
            changes["max_batch"] = self._fit(
                self.kv_cache_mb, per_row, "kv_cache_mb", "one sequence of max_len"
            )
        if self.adapter_cache_mb:
            per_slot = ServedModel.slot_bytes(model, self.max_rank)
            changes["adapter_slots"] = self._fit(
                self.adapter_cache_mb, per_slot, "adapter_cache_mb", "one adapter slot"
            )
        return replace(self, **changes)

    @staticmethod
    def _fit(budget_mb: int, each: int, key: str, what: str) -> int:
        count = budget_mb * 2**20 // each
        if count < 1:
            raise RequestError(
                f"engine {key} {budget_mb} MB is less than {what} needs ({each / 2**20:.1f} MB)"
            )
        return int(count)


@dataclass(eq=False)  # compared by identity: a queue holds each sequence once
class Sequence:
    """One request's sequence: its prompt, adapter and sampling, where it is in the KV cache, and
    where its tokens go (`sink`, called on the engine's thread with each TokenOutput or an error)."""

    id: str
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Sink
    generator: torch.Generator | None = None
    row: int | None = None
    slot: int | None = None
    cached: int = 0  # tokens whose keys and values are in the cache (its adapter's prefix included)
    start: int = 0  # the prompt's first position: after the adapter's key/value prefix, if it has one
    output: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    ending: str | None = None  # how it finished: stop, length

    @property
    def prefilling(self) -> bool:
        return self.cached < self.start + len(self.prompt)


class EngineCore:
    """The scheduler and the step loop, single-threaded: `add`, then `step` until `idle`."""

    def __init__(self, model: nn.Module, tokenizer: Any, loader: Loader | None, config: EngineConfig) -> None:
        self.config = config = config.sized(model)
        self.served = ServedModel(
            model, config.max_batch, config.max_len, config.adapter_slots, config.max_rank
        )
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.eos_ids = _eos_ids(model, tokenizer)
        self.base_slot = config.adapter_slots
        self.buffers = StepBuffers(config.max_batch + config.chunk, config.max_batch, config.adapter_slots,
                                   config.max_len, self.dtype, self.device)  # fmt: skip
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(config.max_batch))
        self.steps = 0
        # Observers of what happens (metrics): each is called on the engine's thread as
        # listener(event, data); events and their data are listed in EVENTS.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.adapters = AdapterCache(
            self.served, model, loader, config.adapter_slots, config.max_len, self._event
        )
        if loader is not None:  # compile the mixed-adapter kernel now, not in a request's first step
            GATHERED.warm(self.dtype, self.device)

    # -- requests -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence (checked first: a RequestError, and nothing queued, if it cannot run)."""
        if len(seq.prompt) == 0:
            raise RequestError("the prompt is empty: give at least one token")
        if len(seq.prompt) >= self.config.max_len:
            raise RequestError(
                f"the prompt has {len(seq.prompt)} tokens; this server takes at most {self.config.max_len - 1}"
            )
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the server's queue is full ({self.config.max_queue} waiting); retry later")
        if seq.adapter is not None:
            self.adapters.request(seq.adapter)
            if self.adapters.slot(seq.adapter) is not None:
                self._event("adapter_hit", adapter=seq.adapter)
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        self.waiting.append(seq)

    def preload(self, key: str, done: Callable[[Exception | None], None]) -> None:
        """Load an adapter into a slot without a request; `done(None)` once it is there, else
        `done(error)`."""
        self.adapters.request(key, done)

    def add_request(self, prompt: list[int], adapter: str | None, params: SamplingParams) -> list[Any]:
        """Queue one request; its outputs (TokenOutputs, or a final exception) collect in the list returned."""
        outputs: list[Any] = []
        self.add(Sequence(f"r{id(outputs)}", list(prompt), adapter, params, outputs.append))
        return outputs

    def abort(self, seq_id: str, error: Exception | None = None) -> None:
        """End a sequence now: with `error`, or quietly (its client went away)."""
        for seq in [*self.waiting, *self.running]:
            if seq.id == seq_id:
                self._finish(seq, error or "abort")

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def busy(self) -> bool:
        """Anything to do: sequences, or adapter loads to place."""
        return not self.idle or self.adapters.busy

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit what fits, run one forward (decode tokens + prefill chunks), sample, emit."""
        self.adapters.place(self._adapter_failed)
        self._admit()
        if not self.running:
            return
        decode = [s for s in self.running if not s.prefilling]
        prefill = self._prefill_chunks()  # (sequence, tokens this step), oldest first
        start = time.perf_counter()
        with torch.inference_mode():
            step = self.buffers.fill(decode, prefill)
            logits = self.served(step)
        self.steps += 1
        self._event("step", decode=len(decode), prefill=step.chunk, batch=len(self.running),
                    seconds=time.perf_counter() - start)  # fmt: skip
        done = [prefill[i][0] for i in step.finishing]  # their prompts are read: their first tokens now
        for seq in decode:
            seq.cached += 1
        for seq, n in prefill:
            seq.cached += n
        sampled = [*decode, *done]
        outs = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        for seq, out in zip(sampled, outs, strict=True):
            self._emit(seq, out)

    def _prefill_chunks(self) -> list[tuple[Sequence, int]]:
        """Prompt tokens to read this step: the sequences still reading theirs, oldest first, each
        as much as is left of the `chunk` budget."""
        budget, chunks = self.config.chunk, []
        for seq in self.running:
            if budget and seq.prefilling:
                n = min(budget, seq.start + len(seq.prompt) - seq.cached)
                chunks.append((seq, n))
                budget -= n
        return chunks

    def _admit(self) -> None:
        blocked = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            if seq.adapter is not None:
                seq.slot = self.adapters.slot(seq.adapter)
                if seq.slot is None:  # still loading, or evicted while it waited: (re)load it
                    self.adapters.request(seq.adapter)
                    blocked.append(seq)
                    continue
            else:
                seq.slot = self.base_slot
            prefix = self.adapters.prefix(seq.adapter)
            if prefix is not None and prefix[0].shape[2] + len(seq.prompt) >= self.config.max_len:
                self.waiting.appendleft(seq)  # _finish takes it from the queue and tells its sink
                self._finish(seq, RequestError(
                    f"the prompt has {len(seq.prompt)} tokens and adapter {seq.adapter!r} puts {prefix[0].shape[2]} "
                    f"before them; this server takes at most {self.config.max_len - 1} in all"
                ))  # fmt: skip
                continue
            seq.row = self.free_rows.pop(0)
            if prefix is not None:  # a prompt- or prefix-tuned adapter: its keys and values come first
                keys, values = prefix  # (layers, KVH, P, D)
                seq.start = seq.cached = keys.shape[2]
                self.served.cache.write_prefix(seq.row, keys, values)
            if seq.adapter is not None:
                self.adapters.acquire(seq.adapter)  # running on it: its slot is pinned
            self.running.append(seq)
            self._event("admit", adapter=seq.adapter, queue_seconds=time.perf_counter() - seq.arrived)
        self.waiting.extendleft(reversed(blocked))

    def _adapter_failed(self, key: str, error: Exception) -> None:
        for seq in [s for s in self.waiting if s.adapter == key]:
            self._finish(seq, error)

    def _emit(self, seq: Sequence, out: tuple[int, float | None, dict[int, float]]) -> None:
        token, logprob, top = out
        seq.output.append(token)
        reason = None
        if not seq.params.ignore_eos and (token in self.eos_ids or token in seq.params.stop_token_ids):
            reason = "stop"
        elif len(seq.output) >= seq.params.max_tokens or seq.cached + 1 >= self.config.max_len:
            reason = "length"
        seq.sink(TokenOutput(token, logprob, top, reason))
        if reason:
            seq.ending = reason
            self._finish(seq, None)

    def _finish(self, seq: Sequence, reason: str | Exception | None) -> None:
        """Take a sequence out, free its row, and tell its sink when it ends otherwise than by a token
        (an error; a quiet "abort" tells nobody: its client is gone)."""
        if seq in self.running:
            self.running.remove(seq)
            self.free_rows.append(seq.row)
            self.free_rows.sort()
            if seq.adapter is not None:
                self.adapters.release(seq.adapter)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        ending = "error" if isinstance(reason, Exception) else reason or seq.ending
        self._event("finish", adapter=seq.adapter, reason=ending, prompt_tokens=len(seq.prompt),
                    output_tokens=len(seq.output))  # fmt: skip
        if isinstance(reason, Exception):
            seq.sink(reason)

    def fail_running(self, error: Exception) -> None:
        """End every running sequence with `error` (a step failed); waiting ones stay queued."""
        for seq in list(self.running):
            self._finish(seq, error)

    def fail_all(self, error: Exception) -> None:
        """End every sequence and every preload with `error` (the engine stops)."""
        for seq in [*self.waiting, *self.running]:
            self._finish(seq, error)
        self.adapters.fail_waiters(error)

    def _event(self, name: str, **data: Any) -> None:
        for listener in self.listeners:
            listener(name, data)

    # -- synchronous use --------------------------------------------------------------------------
    def run(self, requests: list[tuple[list[int], str | None, SamplingParams]]) -> list[list[TokenOutput]]:
        """Serve `requests` together to completion: each one's outputs, the last an exception when it
        failed (which fails only that request)."""
        results = [self.add_request(prompt, adapter, params) for prompt, adapter, params in requests]
        while not self.idle:
            self.step()
            if not self.running and self.adapters.busy:
                time.sleep(0.001)  # only adapter loads in flight
        return results

    def close(self) -> None:
        self.adapters.close()


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(tokenizer.eos_token_id)
    return found
