"""The engine's scheduler and step: continuous batching over token ids, many adapters in every step.

Each step decodes one token for every running sequence and, when one is still reading its prompt,
prefills one chunk of it (at most `chunk` tokens), so a long prompt never stalls the others.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError, RequestError
from .model import ServedModel, StepLayout
from .sampling import sample
from .slots import Routing, SlotTable
from .types import AdapterLoadError, QueueFullError, SamplingParams, TokenOutput

STAGED = (
    "staged"  # the name an adapter has in the loading AdaptedModel (keys like name@3 are no adapter names)
)
EVENTS = {
    "step": "one forward: decode (tokens), prefill (tokens), batch (sequences), seconds",
    "admit": "a request starts running: adapter (key or None), queue_seconds",
    "finish": "a request ends: adapter, reason (stop/length/abort/error), prompt_tokens, output_tokens",
    "adapter_hit": "a request's adapter is resident already: adapter",
    "adapter_load": "an adapter was loaded (ok) or failed: adapter, seconds, ok",
    "adapter_evict": "an idle adapter left its slot for another: adapter",
}
PREFIX = "prefix"  # a loaded whole-model adapter: its (keys, values) instead of slot tensors
Loader = Callable[[str], Path]  # adapter key -> its directory (PEFT format)
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


@dataclass
class Sequence:
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
        self.model, self.loader = model, loader
        self.eos_ids = _eos_ids(model, tokenizer)
        self.slots = SlotTable(config.adapter_slots)
        self.base_slot = config.adapter_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(config.max_batch))
        self.loads: dict[str, Future] = {}  # adapter key -> its load on the worker thread
        self.ready: dict[str, dict] = {}  # loaded adapters waiting for a free slot
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="peftkit-adapter-load")
        self.staging: Any = None  # the AdaptedModel adapters are loaded through, made on first use
        self.waiters: dict[str, list[Callable[[Exception | None], None]]] = {}  # preload callbacks
        self.prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # resident keys' K/V prefixes
        self.steps = 0
        # Observers of what happens (metrics): each is called on the engine's thread as
        # listener(event, data); events and their data are listed in EVENTS.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.dtype = model.lm_head.weight.dtype

    # -- requests -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(seq.prompt) == 0:
            raise RequestError("the prompt is empty: give at least one token")
        if len(seq.prompt) >= self.config.max_len:
            raise RequestError(
                f"the prompt has {len(seq.prompt)} tokens; this server takes at most {self.config.max_len - 1}"
            )
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the server's queue is full ({self.config.max_queue} waiting); retry later")
        if seq.adapter is not None:
            if self.loader is None:
                raise AdapterLoadError(f"this server has no adapters; {seq.adapter!r} is unknown")
            self.slots.refs[seq.adapter] = self.slots.refs.get(seq.adapter, 0) + 1
            if self.slots.get(seq.adapter) is not None:
                self._event("adapter_hit", adapter=seq.adapter)
            if (
                self.slots.get(seq.adapter) is None
                and seq.adapter not in self.loads
                and seq.adapter not in self.ready
            ):
                self.loads[seq.adapter] = self.worker.submit(self._timed_load, seq.adapter)
        if seq.params.seed is not None:
            seq.generator = torch.Generator().manual_seed(seq.params.seed)
        self.waiting.append(seq)

    def preload(self, key: str, done: Callable[[Exception | None], None]) -> None:
        """Load an adapter into a slot without a request; `done(None)` once it is there, else
        `done(error)`."""
        if self.loader is None:
            done(AdapterLoadError(f"this server has no adapters; {key!r} is unknown"))
            return
        if self.slots.get(key) is not None:
            done(None)
            return
        self.waiters.setdefault(key, []).append(done)
        if key not in self.loads and key not in self.ready:
            self.loads[key] = self.worker.submit(self._timed_load, key)

    def add_request(self, prompt: list[int], adapter: str | None, params: SamplingParams) -> list[Any]:
        """Queue one request; its outputs (TokenOutputs, or a final exception) collect in the list returned."""
        outputs: list[Any] = []
        self.add(
            Sequence(
                f"r{self.steps}-{len(self.waiting)}-{id(outputs)}",
                list(prompt),
                adapter,
                params,
                outputs.append,
            )
        )
        return outputs

    def abort(self, seq_id: str) -> None:
        for seq in [*self.waiting, *self.running]:
            if seq.id == seq_id:
                self._finish(seq, "abort")

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- adapters -------------------------------------------------------------------------------
    def _timed_load(self, key: str) -> tuple[float, Any]:
        start = time.perf_counter()
        try:
            return time.perf_counter() - start, self._load(key)
        except Exception as e:  # noqa: BLE001 (the error and the time both go to the engine thread)
            return time.perf_counter() - start, e

    def _load(self, key: str) -> dict[str, dict[str, torch.Tensor]]:
        """On the worker thread: the adapter's slot tensors per served layer, checked."""
        from ..adapted import AdaptedModel
        from ..methods import method_for

        try:
            if self.staging is None:
                self.staging = AdaptedModel(self.model)
            path = self.loader(key)
            self.staging.load_adapter(path, STAGED, dtype=self.dtype)
        except PeftkitError as e:
            raise AdapterLoadError.of(key, e) from None
        try:
            spec = method_for(self.staging.configs[STAGED])
            if not spec.wraps_layers:
                return {PREFIX: self._prefix(spec)}
            if spec.slot_tensors is None:
                raise AdapterLoadError(
                    f"adapter {key!r} is {spec.label}, which the server does not serve yet"
                )
            tensors = {}
            for name, layer in self.staging.adapter_layers():
                if STAGED not in layer.specs:
                    continue
                if name not in self.served.linears:
                    raise AdapterLoadError(f"adapter {key!r} adapts {name}, which the server does not serve")
                tensors[name] = {r: t.clone() for r, t in spec.slot_tensors(layer, STAGED).items()}
                self.served.linears[name].check(tensors[name], f"adapter {key!r}, layer {name}")
            return tensors
        except RequestError as e:
            raise AdapterLoadError(str(e)) from None
        finally:
            if STAGED in self.staging.configs:
                self.staging.delete_adapter(STAGED)

    def _prefix(self, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole-model adapter's key/value prefix (layers, KVH, P, D), computed once (prompt tuning
        runs its soft tokens through the base model here)."""
        adapter = self.staging.model_adapters[STAGED]
        if not hasattr(adapter, "prefix_kv"):
            raise AdapterLoadError(f"{spec.label} adapters are not served yet")
        with torch.inference_mode():
            kv = adapter.prefix_kv(self.model)
        keys = torch.stack([k for k, _ in kv]).to(self.dtype)
        values = torch.stack([v for _, v in kv]).to(self.dtype)
        if keys.shape[2] >= self.config.max_len:
            raise AdapterLoadError(f"its prefix of {keys.shape[2]} tokens fills the server's max_len")
        return keys.clone(), values.clone()

    def _place_loaded(self) -> None:
        """Adapters the worker finished: into slots (or their requests fail with the load's error)."""
        for key, future in list(self.loads.items()):
            if future.done():
                del self.loads[key]
                seconds, result = future.result()
                self._event(
                    "adapter_load", adapter=key, seconds=seconds, ok=not isinstance(result, Exception)
                )
                if not isinstance(result, Exception):
                    self.ready[key] = result
                else:  # the failure fails only this adapter's requests
                    e = result
                    error = (
                        e if isinstance(e, AdapterLoadError) else AdapterLoadError(f"adapter {key!r}: {e}")
                    )
                    for seq in [s for s in self.waiting if s.adapter == key]:
                        self._finish(seq, error)
                    for done in self.waiters.pop(key, []):
                        done(error)
        for key in list(self.ready):
            taken = self.slots.take()
            if taken is None:
                return  # every slot is busy: wait for one to go idle
            slot, evicted = taken
            if evicted is not None:
                self.prefixes.pop(evicted, None)
                self._event("adapter_evict", adapter=evicted)
            if PREFIX in self.ready[key]:
                self.prefixes[key] = self.ready[key][PREFIX]
            for layer_name, linear in self.served.linears.items():
                tensors = self.ready[key].get(layer_name)
                if tensors is None:
                    linear.clear(slot)
                else:
                    linear.write(slot, tensors)
            self.slots.put(key, slot)
            del self.ready[key]
            for done in self.waiters.pop(key, []):
                done(None)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit what fits, run one forward (decode tokens + one prefill chunk), sample, emit."""
        self._place_loaded()
        self._admit()
        if not self.running:
            if self.loads:
                time.sleep(0.001)  # only adapter loads in flight
            return
        decode = [s for s in self.running if not s.prefilling]
        prefill = next((s for s in self.running if s.prefilling), None)
        chunk = min(self.config.chunk, prefill.start + len(prefill.prompt) - prefill.cached) if prefill else 0
        ids = [s.output[-1] for s in decode]
        positions = [s.cached for s in decode]
        if prefill:
            read = prefill.cached - prefill.start
            ids += prefill.prompt[read : read + chunk]
            positions += list(range(prefill.cached, prefill.cached + chunk))
        layout = StepLayout(
            torch.tensor([s.row for s in decode], dtype=torch.long),
            torch.tensor([s.cached + 1 for s in decode], dtype=torch.long),
            prefill.row if prefill else None,
            prefill.cached if prefill else 0,
            chunk,
        )
        rt = Routing.build([s.slot for s in decode], prefill.slot if prefill else None, chunk, self.dtype)
        done_prefill = prefill is not None and prefill.cached + chunk == prefill.start + len(prefill.prompt)
        last = list(range(len(decode))) + ([len(ids) - 1] if done_prefill else [])
        device = self.served.lm_head.weight.device
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.served(
                torch.tensor(ids, device=device),
                torch.tensor(positions, device=device),
                rt,
                layout,
                torch.tensor(last, dtype=torch.long, device=device),
            )
        self.steps += 1
        self._event("step", decode=len(decode), prefill=chunk, batch=len(self.running),
                    seconds=time.perf_counter() - start)  # fmt: skip
        for seq in decode:
            seq.cached += 1
        if prefill:
            prefill.cached += chunk
        sampled = [*decode, prefill] if done_prefill else decode
        for seq, out in zip(
            sampled, sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        ):
            self._emit(seq, out)

    def _admit(self) -> None:
        blocked = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            if seq.adapter is not None:
                seq.slot = self.slots.get(seq.adapter)
                if seq.slot is None:
                    blocked.append(seq)  # its adapter is still loading
                    continue
            else:
                seq.slot = self.base_slot
            prefix = self.prefixes.get(seq.adapter)
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
                self.served.k_cache[:, seq.row, :, : seq.start] = keys
                self.served.v_cache[:, seq.row, :, : seq.start] = values
            self.running.append(seq)
            self._event("admit", adapter=seq.adapter, queue_seconds=time.perf_counter() - seq.arrived)
        self.waiting.extendleft(reversed(blocked))

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
        """Take a sequence out, free its row, and tell its sink when it ends otherwise than by a token."""
        if seq in self.running:
            self.running.remove(seq)
            self.free_rows.append(seq.row)
            self.free_rows.sort()
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        if seq.adapter is not None:
            self.slots.refs[seq.adapter] -= 1
        ending = "error" if isinstance(reason, Exception) else reason or seq.ending
        self._event("finish", adapter=seq.adapter, reason=ending, prompt_tokens=len(seq.prompt),
                    output_tokens=len(seq.output))  # fmt: skip
        if isinstance(reason, Exception):
            seq.sink(reason)
        elif reason:
            seq.sink(TokenOutput(-1, finish_reason=reason))

    def fail_running(self, error: Exception) -> None:
        """End every running sequence with `error` (a step failed); waiting ones stay queued."""
        for seq in list(self.running):
            self._finish(seq, error)

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
        return results

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(tokenizer.eos_token_id)
    return found
