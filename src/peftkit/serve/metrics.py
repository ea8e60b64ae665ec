"""Monitoring for `peftkit serve`: Prometheus metrics per adapter, version and tenant, a JSON view of
the same numbers, and the built-in dashboard page that draws them.

    metrics = install_metrics(app, engine)   # GET /metrics, /metrics.json, /dashboard; the engine's events
    metrics.views["splits"] = canary_splits  # more sections for /metrics.json and the dashboard

Engine-side numbers (queue time, batch size, step time, adapter loads, load time, evictions, cache
hits) come from the engine's events (`scheduler.EVENTS`), on the engine's thread. Request-side ones
(requests by outcome, prompt and output tokens, latency, time to first token, time per output token,
each with the request's tenant) come from choices.py, which times every choice through
`request_timer(engine, key, tenant, prompt_tokens)`. Gauges of the engine's state (running, waiting,
resident adapters) are read when scraped. Each app has its own CollectorRegistry, so several servers
in one process never mix their numbers. The labels of an adapter are its engine key split at `@`:
`support@3` is adapter="support", version="3"; an `--adapters` name has version=""; the base model
is adapter="".
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from importlib.resources import files
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from .types import AdapterLoadError, QueueFullError, ShuttingDownError

__all__ = ["Metrics", "install_metrics", "request_timer"]

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REQUEST_LABELS = ("adapter", "version", "tenant")
ADAPTER_LABELS = ("adapter", "version")
# The dashboard is one file with its script inline: it may fetch only from this server.
DASHBOARD_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"
_HELP = {
    "requests": "sequences served, by how they ended (a request with n choices counts n)",
    "prompt": "prompt tokens of the sequences that ran",
    "output": "tokens generated (as usage counts them, an end-of-sequence token too)",
    "latency": "from the engine taking a sequence to its last token (those that ended by stop or length)",
    "ttft": "from the engine taking a sequence to its first token",
    "tpot": "mean time per token after the first (sequences of two tokens or more)",
    "queue": "time waiting to join the running batch (a load of its adapter included)",
    "batch": "sequences in the running batch, per engine step",
    "step": "time of one engine forward",
    "step_tokens": "tokens run through the model, by phase (decode, prefill)",
    "hits": "requests whose adapter was resident already",
    "loads": "adapter loads, by result (ok, error)",
    "load": "time to load an adapter's files and check them (successful loads)",
    "evictions": "idle adapters that left their slot for another",
    "http": "HTTP responses, by route and status",
    "captured": "traffic samples stored in the registry (one per choice of a sampled response)",
    "dropped": "traffic samples not stored (the capture queue was full, or the registry failed)",
    "feedback": "feedback given on responses (POST /v1/feedback), by label: up, down, neutral",
    "runs": "the server's own monitor runs (monitor_every), by result: ok, alert, failed",
}
_ERRORS = ((QueueFullError, "queue_full"), (ShuttingDownError, "shutting_down"),
           (AdapterLoadError, "adapter_load_failed"))  # fmt: skip


def split_key(key: str | None) -> tuple[str, str]:
    """(adapter, version) labels of an engine key: "bot@3" -> ("bot", "3"), "bot" -> ("bot", ""),
    None (the base model) -> ("", "")."""
    if key is None:
        return "", ""
    name, _, version = key.rpartition("@")
    return (name, version) if name else (key, "")


def outcome(reason: str | BaseException) -> str:
    """The finish_reason label: stop, length or abort, or what an error was (queue_full,
    shutting_down, adapter_load_failed, error)."""
    if isinstance(reason, str):
        return reason
    return next((name for kind, name in _ERRORS if isinstance(reason, kind)), "error")


class Metrics:
    """Every metric of one server, in its own registry. `views` maps a name to a callable whose
    JSON-able result /metrics.json carries under that name (the dashboard draws `splits`)."""

    def __init__(self, engine: Any | None = None) -> None:
        self.registry = r = CollectorRegistry()
        per_request, per_adapter = REQUEST_LABELS, ADAPTER_LABELS
        ended = [*per_request, "finish_reason"]
        self.requests = Counter("peftkit_requests", _HELP["requests"], ended, registry=r)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", _HELP["prompt"], per_request, registry=r)
        self.output_tokens = Counter("peftkit_output_tokens", _HELP["output"], per_request, registry=r)
        self.latency = Histogram(
            "peftkit_request_seconds", _HELP["latency"], per_request, buckets=SECONDS, registry=r
        )
        self.ttft = Histogram(
            "peftkit_time_to_first_token_seconds", _HELP["ttft"], per_request, buckets=SECONDS, registry=r
        )
        self.tpot = Histogram(
            "peftkit_time_per_output_token_seconds",
            _HELP["tpot"],
            per_request,
            buckets=TOKEN_SECONDS,
            registry=r,
        )
        self.queue = Histogram(
            "peftkit_queue_seconds", _HELP["queue"], per_adapter, buckets=SECONDS, registry=r
        )
        self.batch = Histogram("peftkit_batch_size", _HELP["batch"], buckets=BATCH, registry=r)
        self.step = Histogram("peftkit_step_seconds", _HELP["step"], buckets=TOKEN_SECONDS, registry=r)
        self.step_tokens = Counter("peftkit_step_tokens", _HELP["step_tokens"], ["phase"], registry=r)
        self.hits = Counter("peftkit_adapter_cache_hits", _HELP["hits"], per_adapter, registry=r)
        self.loads = Counter("peftkit_adapter_loads", _HELP["loads"], [*per_adapter, "result"], registry=r)
        self.load_seconds = Histogram(
            "peftkit_adapter_load_seconds", _HELP["load"], per_adapter, buckets=SECONDS, registry=r
        )
        self.evictions = Counter("peftkit_adapter_evictions", _HELP["evictions"], per_adapter, registry=r)
        self.http = Counter("peftkit_http_requests", _HELP["http"], ["path", "status"], registry=r)
        self.captured = Counter("peftkit_capture_samples", _HELP["captured"], per_adapter, registry=r)
        self.capture_dropped = Counter("peftkit_capture_dropped", _HELP["dropped"], registry=r)
        self.feedback = Counter("peftkit_feedback", _HELP["feedback"], [*per_adapter, "label"], registry=r)
        self.monitor_runs = Counter("peftkit_monitor_runs", _HELP["runs"], ["result"], registry=r)
        self.engine = engine
        self.views: dict[str, Callable[[], Any]] = {}
        if engine is not None:
            r.register(_EngineCollector(engine))

    # -- the engine's events (on its thread) -----------------------------------------------------------
    def on_event(self, event: str, data: dict[str, Any]) -> None:
        """The engine listener: one event of `scheduler.EVENTS` (others are ignored)."""
        if event == "step":
            self.batch.observe(data["batch"])
            self.step.observe(data["seconds"])
            self.step_tokens.labels("decode").inc(data["decode"])
            self.step_tokens.labels("prefill").inc(data["prefill"])
        elif event == "admit":
            self.queue.labels(*split_key(data["adapter"])).observe(data["queue_seconds"])
        elif event == "adapter_hit":
            self.hits.labels(*split_key(data["adapter"])).inc()
        elif event == "adapter_load":
            labels = split_key(data["adapter"])
            self.loads.labels(*labels, "ok" if data["ok"] else "error").inc()
            if data["ok"]:
                self.load_seconds.labels(*labels).observe(data["seconds"])
        elif event == "adapter_evict":
            self.evictions.labels(*split_key(data["adapter"])).inc()

    # -- views -------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """Every metric family, without prometheus_client's `_created` timestamps (one more series per
        labelled child that neither Prometheus' rates nor the dashboard use)."""
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self)  # a registry or anything with collect()

    def snapshot(self) -> dict[str, Any]:
        """The same numbers as JSON: every sample, the engine's state, its resident adapters, and each
        of `views` (`splits` is None until a view provides it)."""
        series = [
            {"name": s.name, "labels": s.labels, "value": s.value}
            for family in self.collect()
            for s in family.samples
        ]
        out: dict[str, Any] = {"time": time.time(), "series": series, "splits": None}
        if self.engine is not None:
            out["engine"] = self.engine.stats()
            out["adapters"] = [
                dict(zip(ADAPTER_LABELS, split_key(a["key"])), **a) for a in self.engine.adapters()
            ]
        out.update({name: view() for name, view in self.views.items()})
        return out


class _EngineCollector:
    """Gauges of the engine's state, read when scraped."""

    GAUGES = (
        ("peftkit_requests_running", "running", "sequences in the running batch"),
        ("peftkit_requests_waiting", "waiting", "sequences waiting to join the batch"),
        ("peftkit_adapters_loading", "loading", "adapter loads in flight"),
        ("peftkit_batch_rows", "rows", "the most sequences decoded together (KV cache rows)"),
        ("peftkit_adapter_slots", "adapter_slots", "adapters that fit in memory at once"),
    )

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats, adapters = self.engine.stats(), self.engine.adapters()
        for name, key, help in self.GAUGES:
            yield GaugeMetricFamily(name, help, value=stats[key])
        resident = GaugeMetricFamily("peftkit_adapter_resident", "1 for each adapter in a slot",
                                     labels=[*ADAPTER_LABELS, "slot"])  # fmt: skip
        in_flight = GaugeMetricFamily("peftkit_adapter_requests_in_flight", "requests using each "
                                      "resident adapter", labels=list(ADAPTER_LABELS))  # fmt: skip
        for a in adapters:
            resident.add_metric([*split_key(a["key"]), str(a["slot"])], 1)
            in_flight.add_metric(list(split_key(a["key"])), a["requests"])
        yield resident
        yield in_flight


# -- per request (choices.py) ----------------------------------------------------------------------------
class RequestTimer:
    """The timings of one sequence, from when it is handed to the engine: `token()` at each token it
    produces, `end(reason, output_tokens)` once, however it ends."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str], prompt_tokens: int) -> None:
        self.metrics, self.labels, self.prompt_tokens = metrics, labels, prompt_tokens
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.labels(*self.labels).observe(self.first - self.start)

    def end(self, reason: str | BaseException, output_tokens: int) -> None:
        """`reason`: the finish reason (stop, length, abort) or the error that ended it."""
        m, now = self.metrics, time.perf_counter()
        m.requests.labels(*self.labels, outcome(reason)).inc()
        if self.first is None:  # never ran (refused, or left while waiting): no tokens, no times
            return
        m.prompt_tokens.labels(*self.labels).inc(self.prompt_tokens)
        m.output_tokens.labels(*self.labels).inc(output_tokens)
        if reason in ("stop", "length"):
            m.latency.labels(*self.labels).observe(now - self.start)
            if output_tokens > 1:
                m.tpot.labels(*self.labels).observe((now - self.first) / (output_tokens - 1))


class _NoTimer:
    def token(self) -> None:
        pass

    def end(self, reason: str | BaseException, output_tokens: int) -> None:
        pass


_NO_TIMER = _NoTimer()
_by_engine: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()


def request_timer(engine: Any, key: str | None, tenant: str, prompt_tokens: int) -> RequestTimer | _NoTimer:
    """A timer for one sequence on `engine` (one that does nothing when no metrics are installed)."""
    metrics = _by_engine.get(engine)
    if metrics is None:
        return _NO_TIMER
    return RequestTimer(metrics, (*split_key(key), tenant), prompt_tokens)


# -- the app -------------------------------------------------------------------------------------------
def install_metrics(app: Any, engine: Any) -> Metrics:
    """Add GET /metrics (Prometheus), /metrics.json (the same numbers) and /dashboard to a FastAPI app,
    count its HTTP responses by route and status, and listen to the engine's events. Call it before
    the app starts; a second call returns the first one's Metrics."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    if getattr(app.state, "metrics", None) is not None:
        return app.state.metrics
    metrics = Metrics(engine)
    engine.add_listener(metrics.on_event)
    _by_engine[engine] = metrics
    app.state.metrics = metrics
    page = (files("peftkit.serve") / "dashboard.html").read_text(encoding="utf-8")

    # Plain functions: FastAPI runs them on its thread pool, as reading the engine's state waits for
    # the step in progress.
    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics.json", include_in_schema=False)
    def snapshot() -> JSONResponse:
        return JSONResponse(metrics.snapshot())

    @app.get("/dashboard", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": DASHBOARD_CSP})

    app.add_middleware(_CountResponses, metrics=metrics)
    return metrics


class _CountResponses:
    """ASGI middleware: each HTTP response counted by its route's path ("other" when none matched) and
    status (500 when the app raised before answering)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "other")
            self.metrics.http.labels(path, str(status)).inc()
