"""The serving engine on its own thread, for asyncio callers (the HTTP server):

    engine = Engine.start(model, tokenizer, loader, EngineConfig())
    async for out in engine.generate(prompt_ids, "bot@3", SamplingParams(max_tokens=32)):
        ...                                   # a TokenOutput per token; the last has finish_reason
    engine.stop(deadline=10.0)               # in-flight requests finish (or are aborted at the deadline)

The thread owns the `EngineCore` (scheduler.py); other threads talk to it only through a command
inbox, and it answers each request through its asyncio loop (`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from torch import nn

from ..errors import RequestError
from .scheduler import EngineConfig, EngineCore, Loader, Sequence
from .types import (
    EngineError,
    EngineUnavailableError,
    SamplingParams,
    ShuttingDownError,
    TokenOutput,
)

__all__ = ["Engine", "EngineConfig"]

_request_ids = itertools.count()
log = logging.getLogger("peftkit.serve")


class Engine:
    """An `EngineCore` stepping on a background thread while there is work."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()  # held by the thread while it changes the core
        self.snapshot: tuple[dict[str, Any], list[dict[str, Any]]] = ({}, [])
        # Answers to load/unload calls, given once the snapshot shows their effect: a caller that lists
        # the adapters right after its call then sees it (the engine thread adds and runs these).
        self.answers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], Exception | None]] = []
        self.thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)

    @classmethod
    def start(cls, model: nn.Module, tokenizer: Any, loader: Loader | None, config: EngineConfig) -> Engine:
        engine = cls(EngineCore(model, tokenizer, loader, config))
        engine._publish()
        engine.thread.start()
        return engine

    @property
    def max_len(self) -> int:
        return self.core.config.max_len

    @property
    def eos_ids(self) -> set[int]:
        return self.core.eos_ids

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    # -- requests -------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[TokenOutput]:
        """The request's tokens as they are generated. Errors (a bad adapter, a full queue, a prompt
        too long) are raised here, for this request only. Closing the iterator early aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[TokenOutput | Exception] = asyncio.Queue()
        seq_id = request_id or f"req-{next(_request_ids)}"
        seq = Sequence(
            seq_id,
            list(prompt_ids),
            adapter,
            params,
            lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item),
        )
        accepted: asyncio.Future[None] = loop.create_future()
        if self.stopping:
            raise ShuttingDownError("the server is shutting down; retry on another instance")

        def add() -> None:
            try:
                self.core.add(seq)
            except Exception as e:  # noqa: BLE001 (handed to the caller)
                loop.call_soon_threadsafe(_settle, accepted, e)
            else:
                loop.call_soon_threadsafe(_settle, accepted, None)

        self._send(add)
        await accepted
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq_id)

    def abort(self, request_id: str) -> None:
        """End a request whose client went away (nothing to do once the engine has stopped)."""
        if self.thread.is_alive():
            self._send(lambda: self.core.abort(request_id))

    async def load(self, key: str) -> None:
        """Load an adapter into a slot now (AdapterLoadError if it cannot be served)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._send(lambda: self.core.preload(key, lambda error: self._answer(loop, done, error)))
        await done

    async def unload(self, key: str) -> None:
        """Drop an idle adapter from its slot (AdapterBusyError while requests run on it,
        AdapterNotLoadedError when it is in no slot)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def drop() -> None:
            try:
                self.core.adapters.unload(key)
            except RequestError as e:
                self._answer(loop, done, e)
            else:
                self._answer(loop, done, None)

        self._send(drop)
        await done

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `listener(event, data)` on the engine's thread for each event (scheduler.EVENTS)."""
        with self.lock:
            self.core.listeners.append(listener)

    def adapters(self) -> list[dict[str, Any]]:
        """Each resident adapter: its key, slot and sequences running on it (least recently used first),
        as of the engine's last step (a snapshot: reading it never waits for the engine)."""
        return self.snapshot[1]

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step (a snapshot)."""
        return self.snapshot[0]

    def _answer(
        self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], error: Exception | None
    ) -> None:
        """Settle a load/unload call after the next snapshot (on the engine's thread)."""
        self.answers.append((loop, done, error))

    def _publish(self) -> None:
        """A new snapshot, made on the engine's thread between steps; then the calls it answers."""
        core, cache = self.core, self.core.adapters
        stats = {
            "running": len(core.running),
            "waiting": len(core.waiting),
            "loading": len(cache.loads),
            "steps": core.steps,
            "rows": core.config.max_batch,
            "adapter_slots": core.config.adapter_slots,
        }
        resident = [
            {"key": k, "slot": s, "requests": cache.running.get(k, 0)} for k, s in cache.slots.keys.items()
        ]
        self.snapshot = (stats, resident)
        answers, self.answers = self.answers, []
        for loop, done, error in answers:
            loop.call_soon_threadsafe(_settle, done, error)

    def stop(self, deadline: float = 10.0) -> None:
        """Take no new requests, let in-flight ones finish for up to `deadline` seconds, end the rest
        with ShuttingDownError, and end the thread."""
        self.stopping = True
        self.wake.set()
        end = time.monotonic() + deadline
        while time.monotonic() < end and self.thread.is_alive() and self.core.busy:
            time.sleep(0.01)
        self.stopped.set()
        self.wake.set()
        self.thread.join(timeout=max(1.0, end - time.monotonic()))
        self.core.close()

    # -- the thread -----------------------------------------------------------------------------
    def _send(self, command: Callable[[], None]) -> None:
        if not self.thread.is_alive():
            raise EngineUnavailableError("the engine is not running; retry on another instance")
        self.inbox.put(command)
        self.wake.set()

    def _run_commands(self) -> None:
        while not self.inbox.empty():
            command = self.inbox.get()
            try:
                command()
            except Exception as e:  # noqa: BLE001 (one bad command must not end the engine)
                log.error("engine command failed", exc_info=e)

    def _loop(self) -> None:
        try:
            while not self.stopped.is_set():
                with self.lock:
                    self._run_commands()
                    busy = self.core.busy
                    if busy:
                        self._step()
                    self._publish()
                if not self.core.running and self.core.adapters.busy:
                    time.sleep(0.001)  # only adapter loads in flight: let the worker run
                elif not busy:
                    self.wake.wait(timeout=0.5)
                    self.wake.clear()
            with self.lock:  # what arrived meanwhile, and what is left, ends now
                self._run_commands()
                self.core.fail_all(ShuttingDownError("the server stopped before this request finished"))
                self._publish()
        except BaseException as e:  # the engine died: every request in flight gets the error
            self.error = e
            self.core.fail_all(EngineUnavailableError(f"the engine stopped: {type(e).__name__}"))
            for loop, done, _ in self.answers:  # a load or unload it had done, but not yet shown
                loop.call_soon_threadsafe(_settle, done, EngineUnavailableError("the engine stopped"))
            raise

    def _step(self) -> None:
        """One core step; an error in it ends the requests of that step (a 500 each), not the engine."""
        try:
            self.core.step()
        except Exception as e:  # noqa: BLE001 (any failure; the engine must outlive one bad step)
            log.error(
                "engine step failed; its %d requests end with an error", len(self.core.running), exc_info=e
            )
            self.core.fail_running(
                EngineError(f"the engine failed on this request's step ({type(e).__name__})")
            )


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
