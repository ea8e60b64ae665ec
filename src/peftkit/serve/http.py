"""The OpenAI-compatible HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions
(streaming over SSE), /health and /ready, and the admin API under /admin (adapters and routes). Text and
chat templates are handled here (`text.py`), keys, tenants and routes in `tenants.py`; the engine sees
token ids, an adapter key and SamplingParams. Every refused request gets an OpenAI-style error,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status, never a traceback; those errors,
and /openapi.json's description of them per operation, are in `apierrors.py`.

    app = create_app(engine, tokenizer, catalog, Limits(), access=access, routes=routes)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import PeftkitError, RequestError
from .apierrors import ApiError, as_api_error, install_error_handlers, install_openapi
from .capture import CapturePolicy, Observer
from .catalog import Catalog, Target
from .choices import Choice, Fanout, Limits, plan_max_tokens
from .routes import Routes, models_for, route
from .tenants import Access, Caller
from .text import chat_prompt_ids, check_stop, check_text
from .types import SamplingParams

SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63; choice i of n samples with (seed + i) mod 2**63

__all__ = ["ApiError", "Limits", "as_api_error", "create_app"]


# -- requests ------------------------------------------------------------------------------------
class _Sampling(BaseModel):
    """What both endpoints share. Unknown fields are accepted and ignored (as vLLM does); known
    OpenAI parameters this server cannot honour are refused by name (see `_unsupported`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]]


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


def _unsupported(req: _Sampling) -> None:
    """Refuse OpenAI parameters that would be silently wrong if ignored."""
    checks = {
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "logit_bias": bool(req.logit_bias),
        "echo": getattr(req, "echo", False),
        "suffix": getattr(req, "suffix", None) is not None,
        "best_of": getattr(req, "best_of", None) not in (None, req.n),
    }
    for name in ("tools", "functions", "response_format"):
        value = (req.model_extra or {}).get(name)
        checks[name] = bool(value) and value != {"type": "text"}
    for name, used in checks.items():
        if used:
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported")


# -- access ---------------------------------------------------------------------------------------
def _authenticator(access: Access):
    """The dependency that names the caller (401 for a missing or wrong key when keys are configured)
    and leaves its tenant on `request.state.tenant` for logs and metrics."""

    async def caller(request: Request) -> Caller:
        who = access.authenticate(request.headers.get("authorization", ""))
        request.state.tenant = who.tenant.name if who.tenant else None
        if who.tenant is None:  # no keys configured: any key passes, so the rate limit is per client address
            who = dataclasses.replace(
                who, bucket="ip:" + (request.client.host if request.client else "unknown")
            )
        return who

    return caller


def _tenant(who: Caller) -> str:
    return who.tenant.name if who.tenant else ""  # the metrics' tenant label


# -- the app ----------------------------------------------------------------------------------------
def create_app(
    engine: Any,
    tokenizer: Any,
    catalog: Catalog,
    limits: Limits | None = None,
    *,
    access: Access | None = None,
    routes: Routes | None = None,
    deadline: float = 10.0,
    capture: CapturePolicy | None = None,
) -> FastAPI:
    """The FastAPI app over a started engine. On shutdown it stops the engine, letting requests in
    flight finish within `deadline` seconds (uvicorn first waits for open connections). Without
    `access`, any key is accepted and the admin API is disabled. `capture` says which responses are
    sampled into the catalog's registry (none by default); POST /v1/feedback is always there."""
    from .admin import install_admin  # (admin.py imports ApiError from here)
    from .feedback import install_feedback

    access = access or Access([], None, None)
    routes = routes or Routes()
    app = FastAPI(title="peftkit serve")
    app.state.ready = False
    install_error_handlers(app)
    install_openapi(app, access)
    _add_probes(app, engine, access)
    metrics = _add_monitoring(app, engine, access, routes, catalog.registry)
    observer = Observer(
        capture or CapturePolicy(), catalog.registry, tokenizer, metrics, catalog.base_names[0]
    )
    app.router.lifespan_context = _lifespan(engine, deadline, observer)
    app.state.observer = observer
    app.state.background = []  # started with the app, closed when it stops (schedule.MonitorSchedule)
    _add_openai_api(app, _Api(engine, tokenizer, catalog, limits or Limits(), routes, observer), access)
    install_feedback(app, observer, catalog.registry, access, _authenticator(access))
    install_admin(app, engine, catalog, access, routes)
    return app


def _lifespan(engine: Any, deadline: float, observer: Observer):
    """The app's lifespan: ready while it runs, with its background tasks; on shutdown, those stop, the
    engine stops within `deadline`, then the captured samples still queued are stored."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = True
        for task in app.state.background:
            task.start()
        yield
        app.state.ready = False
        for task in app.state.background:
            await run_in_threadpool(task.close)
        await run_in_threadpool(engine.stop, deadline)
        await run_in_threadpool(observer.close)

    return lifespan


def _add_probes(app: FastAPI, engine: Any, access: Access) -> None:
    """GET /health (the process answers) and /ready (the engine runs and the app is not stopping)."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        if not (request.app.state.ready and engine.running):
            raise ApiError(503, "the server is starting or stopping", kind="server_error", code="not_ready")
        if access.enabled:  # the engine's counters would tell one tenant about the others' traffic
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "ready", **engine.stats()})


def _add_openai_api(app: FastAPI, api: _Api, access: Access) -> None:
    """GET /v1/models, POST /v1/completions and /v1/chat/completions, each behind the caller's key;
    generation requests also count against its rate limit."""
    # (Depends as a default: with postponed annotations FastAPI cannot see an Annotated alias made here)
    caller = Depends(_authenticator(access))

    @app.get("/v1/models")
    async def models(who: Caller = caller) -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(models_for, who, api.routes, api.catalog)}

    # The rate limit charges one token per sequence generated, after the cheap checks (so a request
    # refused for its `n` or its prompt count costs nothing) and before any lookup or tokenizing.
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, who: Caller = caller) -> Any:
        api._check(req)
        access.admit(who, cost=req.n * api._prompt_count(req.prompt))
        return await api.completions(req, who, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request, who: Caller = caller) -> Any:
        api._check(req)
        access.admit(who, cost=req.n)
        return await api.chat(req, who, request)


def _add_monitoring(app: FastAPI, engine: Any, access: Access, routes: Routes, registry: Any) -> Any:
    """/metrics, /metrics.json and /dashboard (metrics.py), with the routes' canary splits and, with a
    registry, the monitor's newest results (watching.py); with tenants, the metrics answer only the
    admin key, as they name every tenant and adapter."""
    from .metrics import install_metrics

    metrics = install_metrics(app, engine)
    metrics.views["splits"] = lambda: (
        [{"route": n, **s.to_dict()} for n, s in list(routes.splits.items())] or None
    )
    if registry is not None:
        from .watching import MonitorCollector

        monitor = MonitorCollector(registry)
        metrics.registry.register(monitor)
        metrics.views["monitor"] = monitor.view
    if access.enabled:
        app.add_middleware(_AdminOnly, access=access, paths=("/metrics", "/metrics.json"))
    return metrics


class _AdminOnly:
    """ASGI middleware: `paths` answer only requests with the admin key (401/403 otherwise)."""

    def __init__(self, app: Any, access: Access, paths: tuple[str, ...]) -> None:
        self.app, self.access, self.paths = app, access, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            headers = dict(scope.get("headers") or [])
            try:
                self.access.check_admin(headers.get(b"authorization", b"").decode("latin-1"))
            except PeftkitError as e:
                await as_api_error(e).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class _Api:
    engine: Any
    tokenizer: Any
    catalog: Catalog
    limits: Limits
    routes: Routes
    observer: Observer

    async def _target(self, req: _Sampling, who: Caller, request: Request) -> Target:
        # On the thread pool: resolving a registry reference reads the database.
        target = await run_in_threadpool(route, req.model, who, self.routes, self.catalog, req.user)
        request.state.adapter = target.key or self.catalog.base_names[0]
        return target

    def _check(self, req: _Sampling) -> tuple[str, ...]:
        _unsupported(req)
        if req.n > self.limits.max_n:
            raise ApiError(400, f"n must be at most {self.limits.max_n}, got {req.n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options needs stream: true", param="stream_options")
        try:
            return check_stop(req.stop)
        except RequestError as e:
            raise ApiError(400, str(e), param="stop") from None

    def _params(
        self,
        req: _Sampling,
        ids: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        i: int,
        default=None,
    ) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + i) % SEED_LIMIT
        n_tokens = plan_max_tokens(len(ids), max_tokens, self.engine.max_len, self.limits, default=default)
        return SamplingParams(
            max_tokens=n_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed, logprobs=logprobs
        )

    def _prompt_count(self, prompt: Any) -> int:
        """How many prompts a completion request gives (a text, or one list of token ids, is one)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return 1
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if len(prompt) > self.limits.max_prompts:
            raise ApiError(400, f"at most {self.limits.max_prompts} prompts per request", param="prompt")
        return len(prompt)

    def _prompt_ids(self, prompt: Any) -> list[list[int]]:
        """Each prompt of a completion request as token ids (text is tokenized without special tokens
        added, as the text is what the client wants continued)."""
        if self._prompt_count(prompt) == 1 and (isinstance(prompt, str) or isinstance(prompt[0], int)):
            prompt = [prompt]
        vocab = len(self.tokenizer)
        rows = []
        for p in prompt:
            if isinstance(p, str):
                self._check_size(len(p), "prompt")
                ids = self.tokenizer(check_text(p, "prompt"), add_special_tokens=False)["input_ids"]
            else:
                ids = list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            rows.append(ids)
        return rows

    async def completions(self, req: CompletionRequest, who: Caller, request: Request) -> Any:
        stops = self._check(req)
        target = await self._target(req, who, request)
        prompts = self._prompt_ids(req.prompt)
        default = self.limits.default_max_tokens
        choices = [
            Choice(
                p * req.n + i, ids, self._params(req, ids, req.max_tokens, req.logprobs, i, default), stops
            )
            for p, ids in enumerate(prompts)
            for i in range(req.n)
        ]
        run = Fanout(self.engine, self.tokenizer, target.key, choices, "cmpl", tenant=_tenant(who))
        await run.start()
        return await self._respond(run, req, target, "text_completion", [len(p) for p in prompts])

    def _check_size(self, chars: int, param: str) -> None:
        """Text far longer than any prompt the engine takes is refused before it is tokenized (which
        would hold the event loop): no token is shorter than a character, and few are longer than 32."""
        limit = 32 * self.engine.max_len
        if chars > limit:
            raise ApiError(400, f"{param} is {chars} characters; this server takes prompts of at most "
                           f"{self.engine.max_len - 1} tokens (at most {limit} characters)", param=param)  # fmt: skip

    async def chat(self, req: ChatRequest, who: Caller, request: Request) -> Any:
        stops = self._check(req)
        target = await self._target(req, who, request)
        try:
            messages = [m.model_dump() for m in req.messages]
            self._check_size(sum(len(str(m.get("content") or "")) for m in messages), "messages")
            ids = await run_in_threadpool(chat_prompt_ids, self.tokenizer, messages)
        except RequestError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = [
            Choice(i, ids, self._params(req, ids, max_tokens, logprobs, i), stops) for i in range(req.n)
        ]
        run = Fanout(self.engine, self.tokenizer, target.key, choices, "chatcmpl", tenant=_tenant(who))
        await run.start()
        return await self._respond(run, req, target, "chat.completion", [len(ids)])

    async def _respond(
        self, run: Fanout, req: _Sampling, target: Target, kind: str, prompt_lengths: list[int]
    ) -> Any:
        chat = kind == "chat.completion"
        headers = {"x-peftkit-adapter": target.key or self.catalog.base_names[0]}  # what served it
        done = (run.id, target.key, req.model, run.tenant, "chat" if chat else "completion", run)
        if not req.stream:
            await run.wait()
            self.observer.done(*done)
            return JSONResponse(run.response(kind, target.model, sum(prompt_lengths), chat), headers=headers)
        usage = bool((req.stream_options or {}).get("include_usage"))
        stream = _observed(run.sse(kind, target.model, sum(prompt_lengths), chat, usage), self.observer, done)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _observed(
    stream: AsyncIterator[str], observer: Observer, done: tuple[Any, ...]
) -> AsyncIterator[str]:
    """`stream`, then the response handed to the observer (however the stream ended)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        observer.done(*done)
