"""The OpenAI-compatible HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions
(streaming over SSE), /health and /ready, and the admin API under /admin (adapters and routes). Text and
chat templates are handled here (`text.py`), keys, tenants and routes in `tenants.py`; the engine sees
token ids, an adapter key and SamplingParams. Every refused request gets an OpenAI-style error,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status, never a traceback.

    app = create_app(engine, tokenizer, catalog, Limits(), access=access, routes=routes)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import PeftkitError, RequestError
from .catalog import Catalog, ModelNotFoundError, Target
from .choices import Choice, Fanout, Limits, ParamError, plan_max_tokens
from .engine import ShuttingDownError
from .tenants import (
    Access,
    AdminDisabledError,
    AuthError,
    Caller,
    RateLimitedError,
    Routes,
    models_for,
    route,
)
from .text import chat_prompt_ids, check_stop, check_text
from .types import AdapterLoadError, EngineError, EngineUnavailableError, QueueFullError, SamplingParams

log = logging.getLogger("peftkit.serve")
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63; choice i of n samples with (seed + i) mod 2**63

__all__ = ["Limits", "create_app"]


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


# -- errors ----------------------------------------------------------------------------------------
class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def as_api_error(e: BaseException) -> ApiError:
    """The API error for any exception (an unexpected one is a 500 that shows no internals)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ModelNotFoundError):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, AuthError):
        code = "invalid_admin_key" if e.admin else "invalid_api_key"
        return ApiError(401, str(e), code=code, headers={"WWW-Authenticate": "Bearer"})
    if isinstance(e, AdminDisabledError):
        return ApiError(403, str(e), kind="permission_error", code="admin_disabled")
    if isinstance(e, RateLimitedError):
        headers = {"Retry-After": str(e.retry_after)}
        return ApiError(429, str(e), kind="rate_limit_error", code="rate_limit_exceeded", headers=headers)
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineUnavailableError):
        return ApiError(
            503, str(e), kind="server_error", code="engine_unavailable", headers={"Retry-After": "1"}
        )
    if isinstance(e, EngineError):
        log.error("engine error", exc_info=e)
        return ApiError(500, str(e), kind="server_error", code="engine_error")
    if isinstance(e, ShuttingDownError):
        return ApiError(503, str(e), kind="server_error", code="shutting_down", headers={"Retry-After": "1"})
    if isinstance(e, ParamError):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, AdapterLoadError):  # the client's message names the adapter and why, no server paths
        log.warning("adapter load failed: %s", e)
        return ApiError(400, e.public, param="model", code="adapter_load_failed")
    if isinstance(e, PeftkitError):
        return ApiError(400, str(e))
    log.error("internal error", exc_info=e)
    return ApiError(500, "internal server error", kind="server_error")


def _install_error_handlers(app: FastAPI) -> None:
    async def validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}").response()
        where = ".".join(loc)
        return ApiError(400, f"{where or 'body'}: {first.get('msg')}", param=where or None).response()

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return ApiError(e.status_code, str(e.detail), kind=kind, headers=e.headers).response()

    async def any_error(request: Request, e: Exception) -> JSONResponse:
        return as_api_error(e).response()

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ApiError, any_error)
    app.add_exception_handler(PeftkitError, any_error)
    app.add_exception_handler(Exception, any_error)


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
) -> FastAPI:
    """The FastAPI app over a started engine. On shutdown it stops the engine, letting requests in
    flight finish within `deadline` seconds (uvicorn first waits for open connections). Without
    `access`, any key is accepted and the admin API is disabled."""
    limits = limits or Limits()
    access = access or Access([], None, None)
    routes = routes or Routes()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = True
        yield
        app.state.ready = False
        await run_in_threadpool(engine.stop, deadline)

    app = FastAPI(title="peftkit serve", lifespan=lifespan)
    app.state.ready = False
    _install_error_handlers(app)
    api = _Api(engine, tokenizer, catalog, limits, routes)
    # (Depends as a default: with postponed annotations FastAPI cannot see an Annotated alias made here)
    caller = Depends(_authenticator(access))

    async def admit(who: Caller = caller) -> Caller:
        access.admit(who)  # generation requests count against the key's rate limit
        return who

    admitted = Depends(admit)

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

    @app.get("/v1/models")
    async def models(who: Caller = caller) -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(models_for, who, routes, catalog)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, who: Caller = admitted) -> Any:
        return await api.completions(req, who, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request, who: Caller = admitted) -> Any:
        return await api.chat(req, who, request)

    from .admin import install_admin  # (admin.py imports ApiError from here)
    from .metrics import install_metrics

    install_admin(app, engine, catalog, access, routes)
    metrics = install_metrics(app, engine)
    metrics.views["splits"] = lambda: (
        [{"route": n, **s.to_dict()} for n, s in list(routes.splits.items())] or None
    )
    if access.enabled:  # the metrics name every tenant and adapter: with tenants, only for the admin
        app.add_middleware(_AdminOnly, access=access, paths=("/metrics", "/metrics.json"))
    return app


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

    def _prompt_ids(self, prompt: Any) -> list[list[int]]:
        """Each prompt of a completion request as token ids (text is tokenized without special tokens
        added, as the text is what the client wants continued)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if len(prompt) > self.limits.max_prompts:
            raise ApiError(400, f"at most {self.limits.max_prompts} prompts per request", param="prompt")
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
        if not req.stream:
            await run.wait()
            return JSONResponse(run.response(kind, target.model, sum(prompt_lengths), chat), headers=headers)
        usage = bool((req.stream_options or {}).get("include_usage"))
        stream = run.sse(kind, target.model, sum(prompt_lengths), chat, usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
