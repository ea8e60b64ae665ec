"""What the server keeps of its traffic for monitoring: a sample of requests and responses (opt-in), and
a memory of recent responses, so feedback on one (`POST /v1/feedback`) finds the adapter that answered.

    policy = CapturePolicy.from_config(config)      # serve.yaml's capture* keys; off by default
    observer = Observer(policy, registry, tokenizer, metrics)
    observer.done(run, facts)                       # once per response, after its last token

Nothing is written on the request path: a response chosen for the sample is queued, and one writer
thread decodes its prompt, applies the redaction rules, and stores the queued samples in the registry's
database in one transaction every FLUSH_SECONDS (so a killed server loses at most the samples of the
last interval; each committed one stays). A full queue, or a registry that is down, drops samples (and
counts them in peftkit_capture_dropped_total) rather than slow a request.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PeftkitError
from ..registry.traffic import Sample, add_samples
from .metrics import split_key

log = logging.getLogger("peftkit.serve")
FLUSH_SECONDS = 0.5
MAX_QUEUED = 10_000  # samples waiting for the writer; more are dropped
REDACTED = "[REDACTED]"


@dataclass(frozen=True)
class CapturePolicy:
    """Which responses are sampled, and how they are stored."""

    rate: float = 0.0
    text: bool = True
    redact: tuple[re.Pattern[str], ...] = ()
    adapters: Mapping[str, float] | None = None  # rate by adapter name
    tenants: Mapping[str, float] | None = None  # rate by tenant (beats the adapter's)
    max_rows: int = 10_000  # per adapter name
    max_bytes: int = 50_000_000  # per adapter name
    memory: int = 100_000  # recent responses remembered for feedback

    @classmethod
    def from_config(cls, config: Any) -> CapturePolicy:
        """From ServeConfig's capture* keys (and feedback_memory); a bad value is a ConfigError naming it."""
        patterns = []
        for i, text in enumerate(_list(config.capture_redact, "capture_redact")):
            try:
                patterns.append(re.compile(text))
            except (re.error, TypeError) as e:
                raise ConfigError(f"capture_redact[{i}] {text!r} is not a regular expression: {e}") from None
        for key in ("capture_max_rows", "capture_max_bytes", "feedback_memory"):
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"invalid value for {key}: {value!r}; expected a whole number of at least 1"
                )
        if not isinstance(config.capture_text, bool):
            raise ConfigError(
                f"invalid value for capture_text: {config.capture_text!r}; expected true or false"
            )
        return cls(
            rate=_rate(config.capture, "capture"),
            text=config.capture_text,
            redact=tuple(patterns),
            adapters=_rates(config.capture_adapters, "capture_adapters"),
            tenants=_rates(config.capture_tenants, "capture_tenants"),
            max_rows=config.capture_max_rows,
            max_bytes=config.capture_max_bytes,
            memory=config.feedback_memory,
        )

    @property
    def on(self) -> bool:
        """Whether any response may be captured."""
        rates = [self.rate, *(self.adapters or {}).values(), *(self.tenants or {}).values()]
        return any(r > 0 for r in rates)

    def rate_for(self, tenant: str, adapter: str) -> float:
        """The tenant's rate if it has one, else the adapter's, else the server's."""
        if self.tenants and tenant in self.tenants:
            return self.tenants[tenant]
        if self.adapters and adapter in self.adapters:
            return self.adapters[adapter]
        return self.rate

    def scrub(self, text: str) -> str:
        """`text` with every match of every redaction rule replaced by [REDACTED]."""
        for pattern in self.redact:
            text = pattern.sub(REDACTED, text)
        return text


def _rate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(
            f"invalid value for {where}: {value!r}; expected a share from 0 to 1 (0.1: one in ten)"
        )
    return float(value)


def _rates(value: Any, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of NAME: RATE, found {value!r:.60}")
    return {str(k): _rate(v, f"{where}.{k}") for k, v in value.items()}


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of regular expressions, found {value!r:.60}")
    return list(value)


@dataclass(frozen=True)
class Served:
    """Who asked for a response and what answered it: what feedback on it is filed under."""

    name: str  # the adapter (for the base model: its name, as /v1/models lists it)
    version: str  # its registry version ("" when none)
    model: str  # what the request named
    tenant: str
    at: float


@dataclass(frozen=True)
class _Pending:
    response_id: str
    served: Served
    kind: str
    choices: list[tuple[int, list[int], str, int, str]]  # (index, prompt ids, output, tokens, finish)
    latency: float
    ttft: float | None


class Observer:
    """Remembers recent responses for feedback, and samples them for the registry (a writer thread)."""

    def __init__(
        self,
        policy: CapturePolicy,
        registry: Any | None,
        tokenizer: Any,
        metrics: Any | None,
        base_name: str = "",
    ) -> None:
        self.policy, self.registry, self.tokenizer, self.metrics = policy, registry, tokenizer, metrics
        self.base_name = base_name  # what the base model's responses are filed under
        self.recent: OrderedDict[str, Served] = OrderedDict()
        self.lock = threading.Lock()
        self.queue: queue.Queue[_Pending | None] = queue.Queue(MAX_QUEUED)
        self.writer: threading.Thread | None = None
        if policy.on and registry is not None:
            self.writer = threading.Thread(target=self._write, name="peftkit-capture", daemon=True)
            self.writer.start()

    def done(self, response_id: str, key: str | None, model: str, tenant: str, kind: str, run: Any) -> None:
        """A response ended (`run`: its choices.Fanout): remember it, and queue it if it is sampled."""
        name, version = split_key(key) if key is not None else (self.base_name, "")
        served = Served(name, version, model, tenant, time.time())
        with self.lock:
            self.recent[response_id] = served
            while len(self.recent) > self.policy.memory:
                self.recent.popitem(last=False)
        if self.writer is None or random.random() >= self.policy.rate_for(tenant, name):
            return
        firsts = [c.first_at for c in run.choices if c.first_at is not None]
        pending = _Pending(
            response_id,
            served,
            kind,
            [(c.index, c.prompt_ids, c.text, c.count, c.finish_reason or "abort") for c in run.choices],
            latency=time.perf_counter() - run.started,
            ttft=min(firsts) - run.started if firsts else None,
        )
        try:
            self.queue.put_nowait(pending)
        except queue.Full:
            self._dropped(len(pending.choices), "the capture queue is full")

    def labels(self, name: str, version: str) -> tuple[str, str]:
        """The metrics' (adapter, version) labels of what served a response: ("", "") for the base model."""
        return ("", "") if name == self.base_name and not version else (name, version)

    def served(self, response_id: str) -> Served | None:
        """What answered a recent response (None when it is not remembered)."""
        with self.lock:
            return self.recent.get(response_id)

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the writer."""
        if self.writer is not None:
            self.queue.put(None)
            self.writer.join(timeout)

    # -- the writer thread -------------------------------------------------------------------------
    def _write(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Pending] = []
            deadline = time.monotonic() + FLUSH_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            if batch:
                self._store(batch)

    def _store(self, batch: list[_Pending]) -> None:
        rows = [row for pending in batch for row in self._samples(pending)]
        try:
            add_samples(
                self.registry.db, rows, max_rows=self.policy.max_rows, max_bytes=self.policy.max_bytes
            )
        except PeftkitError as e:
            self._dropped(len(rows), f"storing them failed ({e})")
            return
        if self.metrics is not None:
            for row in rows:
                self.metrics.captured.labels(*self.labels(row.name, row.version)).inc()

    def _samples(self, pending: _Pending) -> list[Sample]:
        s, scrub = pending.served, self.policy.scrub
        out = []
        for index, prompt_ids, output, tokens, finish in pending.choices:
            prompt = self.tokenizer.decode(prompt_ids)
            out.append(Sample.of(
                scrub(prompt), scrub(output), keep_text=self.policy.text,
                response_id=pending.response_id, choice=index, at=s.at, name=s.name, version=s.version,
                model=s.model, tenant=s.tenant, kind=pending.kind, prompt_tokens=len(prompt_ids),
                output_tokens=tokens, finish_reason=finish, latency=pending.latency, ttft=pending.ttft,
            ))  # fmt: skip
        return out

    def _dropped(self, n: int, why: str) -> None:
        log.warning("capture: %d samples dropped: %s", n, why)
        if self.metrics is not None:
            self.metrics.capture_dropped.inc(n)
