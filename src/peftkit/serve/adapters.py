"""The engine's adapter cache: which adapters are resident in which slot, loading on a worker thread,
least-recently-used eviction of idle ones, and the key/value prefixes of prompt- and prefix-tuned
adapters. Everything here but `_load` runs on the engine's thread.

An adapter is loaded through an `AdaptedModel` over the served model (so it is read, checked and
converted exactly as offline code does), turned into slot tensors (`MethodSpec.slot_tensors`) or a
key/value prefix, and removed from that model again. A layer method is served when the engine's slot
banks hold every role its spec declares (`slots.check_servable`). What would change the shared base
model itself is refused before anything loads: trained biases (`bias` other than "none") and
`modules_to_save`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PeftkitError, RequestError
from .model import ServedModel
from .slots import SLOT_ROLES, SlotTable, check_servable
from .types import AdapterBusyError, AdapterLoadError, AdapterNotLoadedError

STAGED = "staged"  # the adapter's name while it loads (keys like name@3 are no adapter names)
PREFIX = "prefix"  # a loaded whole-model adapter: its (keys, values) instead of slot tensors
Loader = Callable[[str], Path]  # adapter key -> its directory (PEFT format)
Done = Callable[[Exception | None], None]


class AdapterCache:
    """Adapters in `capacity` slots of the served model's banks; `running[key]` counts the sequences
    running on each, which pins it: only an adapter with none running is evicted."""

    def __init__(self, served: ServedModel, model: nn.Module, loader: Loader | None, capacity: int,
                 max_len: int, event: Callable[..., None]) -> None:  # fmt: skip
        self.served, self.model, self.loader, self.max_len = served, model, loader, max_len
        self.event = event
        self.slots = SlotTable(capacity)
        self.running = self.slots.refs
        self.loads: dict[str, Future] = {}  # key -> its load on the worker thread
        self.ready: dict[str, dict] = {}  # loaded, waiting for a slot
        self.waiters: dict[str, list[Done]] = {}
        self.prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (layers, KVH, P, D) each
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="peftkit-adapter-load")
        self.staging: Any = None  # the AdaptedModel adapters load through, made on first use
        self.dtype = model.lm_head.weight.dtype

    @property
    def busy(self) -> bool:
        """Loads in flight or loaded adapters not yet in a slot."""
        return bool(self.loads or self.ready)

    def slot(self, key: str) -> int | None:
        """The adapter's slot if it is resident (marked as just used), else None."""
        return self.slots.get(key)

    def request(self, key: str, done: Done | None = None) -> None:
        """Make the adapter resident: start its load unless it is resident, loading or loaded already.
        `done` (if given) is called with None once it is in a slot, or with the load's error."""
        if self.loader is None:
            error = AdapterLoadError(f"this server has no adapters; {key!r} is unknown")
            if done is None:
                raise error
            done(error)
            return
        if self.slots.get(key) is not None:
            if done is not None:
                done(None)
            return
        if done is not None:
            self.waiters.setdefault(key, []).append(done)
        if key not in self.loads and key not in self.ready:
            self.loads[key] = self.worker.submit(self._timed_load, key)

    def acquire(self, key: str) -> None:
        self.running[key] = self.running.get(key, 0) + 1

    def release(self, key: str) -> None:
        self.running[key] -= 1
        if not self.running[key]:
            del self.running[key]

    def prefix(self, key: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.prefixes.get(key) if key is not None else None

    def unload(self, key: str) -> None:
        """Take an idle adapter out of its slot (AdapterBusyError while sequences run on it)."""
        if self.running.get(key):
            raise AdapterBusyError(f"adapter {key!r} has requests running; unload it when they finish")
        if self.slots.drop(key) is None:
            raise AdapterNotLoadedError(f"adapter {key!r} is not loaded")
        self.prefixes.pop(key, None)

    def place(self, failed: Callable[[str, Exception], None]) -> None:
        """Finished loads into slots; `failed(key, error)` for each one that failed (its requests end)."""
        for key, future in list(self.loads.items()):
            if not future.done():
                continue
            del self.loads[key]
            seconds, result = future.result()
            self.event("adapter_load", adapter=key, seconds=seconds, ok=not isinstance(result, Exception))
            if isinstance(result, Exception):
                self._fail(key, AdapterLoadError.of(key, result), failed)
            else:
                self.ready[key] = result
        for key in list(self.ready):
            taken = self.slots.take()
            if taken is None:
                return  # every slot has sequences running: wait for one to go idle
            slot, evicted = taken
            if evicted is not None:
                self.prefixes.pop(evicted, None)
                self.event("adapter_evict", adapter=evicted)
            tensors = self.ready.pop(key)
            try:
                for layer_name, linear in self.served.linears.items():
                    if layer_name in tensors:
                        linear.write(slot, tensors[layer_name])
                    else:
                        linear.clear(slot)
            except Exception as e:  # noqa: BLE001 (this adapter fails; the slot is left cleared)
                for linear in self.served.linears.values():
                    linear.clear(slot)
                self._fail(key, AdapterLoadError.of(key, e), failed)
                continue
            if PREFIX in tensors:
                self.prefixes[key] = tensors[PREFIX]
            self.slots.put(key, slot)
            for done in self.waiters.pop(key, []):
                done(None)

    def _fail(self, key: str, error: AdapterLoadError, failed: Callable[[str, Exception], None]) -> None:
        failed(key, error)
        for done in self.waiters.pop(key, []):
            done(error)

    def fail_waiters(self, error: Exception) -> None:
        for key in list(self.waiters):
            for done in self.waiters.pop(key):
                done(error)

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)

    # -- the worker thread ----------------------------------------------------------------------
    def _timed_load(self, key: str) -> tuple[float, Any]:
        start = time.perf_counter()
        try:
            return time.perf_counter() - start, self._load(key)
        except Exception as e:  # noqa: BLE001 (the error and the time both go to the engine thread)
            return time.perf_counter() - start, e

    def _load(self, key: str) -> dict[str, Any]:
        """The adapter's slot tensors per served layer (or its prefix), checked. The staging model
        is left without the adapter whatever happens."""
        from ..core.adapted import AdaptedModel
        from ..core.checks import bias_choice, check_adapter_file, saved_modules_of

        if self.staging is None:
            self.staging = AdaptedModel(self.model)
        try:
            path = self.loader(key)
            check_served_base(self.staging, path)  # first, as offline loads do, and in serve's words
            checked = check_adapter_file(self.staging, path, check_base=False)
            if bias_choice(checked.config) != "none" or saved_modules_of(checked.config):
                raise AdapterLoadError(
                    f"adapter {key!r} trains biases or whole modules (bias / modules_to_save), which would "
                    "change the base model every other request shares; the server does not serve those",
                )
            if checked.spec.wraps_layers:
                check_servable(key, checked.spec)
            return self._from_file(key, checked) or self._through_model(key, path)
        except (PeftkitError, RequestError) as e:
            raise AdapterLoadError.of(key, e) from None

    def _from_file(self, key: str, checked: Any) -> dict[str, Any] | None:
        """Slot tensors straight from the checked file's tensors, attaching nothing: for LoRA and
        rsLoRA about 10x faster than through the model. None where the method needs its attached
        layers (DoRA's factor, IA³, prompt and prefix tuning) or a layer is not served (the general
        path then names the problem)."""
        from ..formats import peft as fmt

        spec = checked.spec
        if spec.file_slot_tensors is None:
            return None
        tensors = {}
        for t in checked.targets:
            if t.name not in self.served.linears or t.kind.name != "linear":
                return None
            shapes = spec.expected_shapes(t.module, t.kind, checked.config, t.name)
            saved = {  # copies: a tensor read from the file may map it, and the file may change
                role: checked.files.tensors[fmt.layer_key(t.name, spec.key_suffix(role, t.kind))].to(
                    self.dtype, copy=True
                )
                for role in shapes
            }
            own = spec.file_slot_tensors(checked.config, t.name, saved)
            if own is None:
                return None
            tensors[t.name] = self._slot_ready(key, t.name, own, spec)
        return tensors

    def _through_model(self, key: str, path: Any) -> dict[str, Any]:
        """Slot tensors (or a prefix) by attaching the adapter to the staging model, then removing it."""
        from ..methods import method_for

        try:
            self.staging.load_adapter(path, STAGED, dtype=self.dtype, check_base=False)  # checked in _load
            spec = method_for(self.staging.configs[STAGED])
            if not spec.wraps_layers:
                return {PREFIX: self._prefix(spec)}
            check_servable(key, spec)
            tensors = {}
            for name, layer in self.staging.adapter_layers():
                if STAGED not in layer.specs:
                    continue
                if name not in self.served.linears:
                    raise AdapterLoadError(f"adapter {key!r} adapts {name}, which the server does not serve")
                tensors[name] = self._slot_ready(key, name, spec.slot_tensors(layer, STAGED), spec)
            return tensors
        finally:
            if STAGED in self.staging.configs:
                self.staging.delete_adapter(STAGED)

    def _slot_ready(
        self, key: str, name: str, own: dict[str, torch.Tensor], spec: Any
    ) -> dict[str, torch.Tensor]:
        """One layer's slot tensors as the engine thread copies them: by bank (B transposed into Bt, as
        `SLOT_ROLES` says), here on the worker, each contiguous; checked against the roles the method
        declares and against the slot's size."""
        undeclared = sorted(set(own) - set(spec.slot_roles or ()))
        if undeclared:
            raise AdapterLoadError(
                f"adapter {key!r}: {spec.label} gave slot tensors {undeclared} its spec's slot_roles do not declare"
            )
        ready = {}
        for role, t in own.items():
            bank = SLOT_ROLES[role].bank if role in SLOT_ROLES else role
            ready[bank] = (t.T if bank != role else t).contiguous()
        self.served.linears[name].check(ready, f"adapter {key!r}, layer {name}")
        return ready

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
        if keys.shape[2] >= self.max_len:
            raise AdapterLoadError(f"its prefix of {keys.shape[2]} tokens fills the server's max_len")
        return keys.clone(), values.clone()


def check_served_base(staging: Any, path: Any) -> None:
    """Refuse an adapter trained on another base model, with advice a server's operator can follow: a
    server never loads an adapter onto another base (every request would share the mismatch), so the
    offline commands' override does not exist here. Reads the file's header only (`path` may also be
    the adapter's files, read already)."""
    from safetensors import safe_open

    from ..errors import BaseModelMismatchError
    from ..formats.peft import WEIGHTS_FILE, AdapterFiles
    from ..identity import AdapterIdentity

    if isinstance(path, AdapterFiles):
        identity, path = AdapterIdentity.from_metadata(path.metadata), path.directory
    else:
        path = Path(path)  # the loader may give a str
        try:
            with safe_open(str(path if path.is_file() else path / WEIGHTS_FILE), "pt") as f:
                identity = AdapterIdentity.from_metadata(dict(f.metadata() or {}))
        except Exception:  # noqa: BLE001 (missing or damaged: check_adapter_file, next, says what is wrong)
            return
    recorded, current = identity.base_fingerprint, staging.base_fingerprint()
    if not recorded or recorded == current:
        return  # no record (HF PEFT wrote it): the shape checks still apply
    where = f"`peftkit serve --base {identity.base_model}`" if identity.base_model else "that base"
    raise BaseModelMismatchError(
        f"{path} was trained on base model {identity.base_model or 'another model'!r} (fingerprint "
        f"{recorded[7:19]}), but this server's base model's fingerprint is {current[7:19]}. A server "
        f"loads adapters only onto the base they were trained on: serve it from a server started with {where}"
    )
