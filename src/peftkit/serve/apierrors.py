"""The HTTP API's errors: every refused request is answered with an OpenAI-style body,
`{"error": {"message", "type", "param", "code"}}`, and a 4xx (5xx when the server is at fault), never
a traceback. This module holds the one exception handlers raise (`ApiError`), the status of every
other error (`as_api_error`), the handlers that write them, and their description in /openapi.json:
per operation, the statuses it can really answer with (FastAPI's default 422 is never sent: invalid
requests are 400s), the headers that come with them, and the keys it takes (the security schemes).

    install_error_handlers(app)
    install_openapi(app, access)   # /openapi.json, built on its first request
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import PeftkitError, RegistryError, UnknownAdapterError
from .catalog import ModelNotFoundError
from .engine import ShuttingDownError
from .tenants import Access, AdminDisabledError, AuthError, RateLimitedError
from .types import AdapterLoadError, EngineError, EngineUnavailableError, ParamError, QueueFullError

log = logging.getLogger("peftkit.serve")

__all__ = ["ApiError", "as_api_error", "install_error_handlers", "install_openapi"]


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
    retry = {"Retry-After": "1"}
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
        return ApiError(429, str(e), kind="rate_limit_error", code="queue_full", headers=retry)
    if isinstance(e, EngineUnavailableError):
        return ApiError(503, str(e), kind="server_error", code="engine_unavailable", headers=retry)
    if isinstance(e, EngineError):
        log.error("engine error", exc_info=e)
        return ApiError(500, str(e), kind="server_error", code="engine_error")
    if isinstance(e, ShuttingDownError):
        return ApiError(503, str(e), kind="server_error", code="shutting_down", headers=retry)
    if isinstance(e, ParamError):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, AdapterLoadError):  # the client's message names the adapter and why, no server paths
        log.warning("adapter load failed: %s", e)
        return ApiError(400, e.public, param="model", code="adapter_load_failed")
    if isinstance(e, RegistryError) and not isinstance(e, UnknownAdapterError):
        # The registry failed under the server (its database or files), not the request: retryable.
        # The message stays in the log: it may name the database or a path.
        log.error("registry error: %s", e)
        return ApiError(503, "the adapter registry cannot be used right now; retry shortly",
                        kind="server_error", code="registry_unavailable", headers=retry)  # fmt: skip
    if isinstance(e, PeftkitError):
        return ApiError(400, str(e))
    log.error("internal error", exc_info=e)
    return ApiError(500, "internal server error", kind="server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with an OpenAI-style body: invalid requests (FastAPI's 422) as 400s."""

    async def validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}").response()
        content_type = request.headers.get("content-type")
        if not loc and not _is_json(content_type):  # the body was never read as JSON (curl -d sends a form)
            return ApiError(400, _not_json_message(content_type), code="unsupported_media_type").response()
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


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (application/json, or a +json type), as FastAPI reads it."""
    media = (content_type or "").split(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _not_json_message(content_type: str | None) -> str:
    sent = f"this request's is {content_type!r}" if content_type else "this request has none"
    return (
        "send the request body as JSON with the header `Content-Type: application/json` "
        f"({sent}; with curl: -H 'Content-Type: application/json')"
    )


# -- /openapi.json ---------------------------------------------------------------------------------
# The errors each operation can answer with, besides 400 for a malformed body (any operation that
# takes one) and 500 (any operation). 401 and 403 are then kept as this server's keys allow: see
# `_auth_statuses_not_sent`. An operation not listed gets its prefix's (the fuzz test finds any it misses).
_GENERATION = (400, 401, 404, 429, 503)
ERRORS: dict[str, tuple[int, ...]] = {
    "GET /ready": (503,),
    "GET /v1/models": (401, 503),
    "POST /v1/completions": _GENERATION,
    "POST /v1/chat/completions": _GENERATION,
    "POST /v1/feedback": (401, 404, 429, 503),
    "GET /admin/adapters": (401, 403, 503),
    "GET /admin/routes": (401, 403),
    "POST /admin/adapters/load": (401, 403, 404, 503),
    "POST /admin/adapters/unload": (401, 403, 404, 409, 503),
    "POST /admin/canary": (401, 403, 404, 503),
    "POST /admin/canary/rollback": (401, 403, 404, 503),
}
_BY_PREFIX = {"/admin/": (401, 403), "/v1/": (401,)}
DESCRIPTIONS = {
    400: "The request is malformed or refused: not JSON, a field missing or out of range, an OpenAI "
    "parameter this server does not support, a prompt too long, an adapter that cannot be loaded "
    "(code adapter_load_failed). `param` names the field.",
    401: "The key is missing or wrong (code invalid_api_key; on /admin, invalid_admin_key).",
    403: "The admin API is disabled: no admin_key is configured (code admin_disabled).",
    404: "What the request names is not there (for a model, or one this key may not use: code "
    "model_not_found; for feedback, a response id this key was not served: response_not_found; on "
    "/admin also a route, or an adapter that is not loaded: adapter_not_loaded).",
    409: "The adapter still has requests running (code adapter_busy).",
    429: "The key's rate limit is reached (code rate_limit_exceeded) or the engine's queue is full "
    "(queue_full): retry after Retry-After seconds.",
    500: "The engine failed on a step (code engine_error), or an unexpected error (the message shows "
    "no internals).",
    503: "The engine is not running, the server is shutting down, or the adapter registry cannot be "
    "used (codes engine_unavailable, shutting_down, registry_unavailable): retry after Retry-After "
    "seconds, or on another instance.",
}
_SECONDS = {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}, "required": True}},
    429: {"Retry-After": {"description": "seconds to wait before a retry", **_SECONDS}},
    503: {"Retry-After": {"description": "seconds to wait before a retry", **_SECONDS}},
}
ERROR_SCHEMA = {
    "title": "Error",
    "description": "An OpenAI-style error.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "what went wrong, for a person"},
                "type": {
                    "type": "string",
                    "description": "invalid_request_error, permission_error, rate_limit_error or server_error",
                },
                "param": {"type": ["string", "null"], "description": "the request field at fault"},
                "code": {"type": ["string", "null"], "description": "a stable name for the error"},
            },
        }
    },
}
STREAM_EVENT = {  # (OpenAPI 3.1: an event stream's schema is each event's)
    "description": 'With "stream": true, the 200 is Server-Sent Events: each data is a JSON chunk (or an '
    "error, when one happens after the response started), the last is [DONE].",
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}
# Answers that differ from the above on one operation: (operation, status) -> (description, headers).
_AUDIT_503 = "The registry's audit log cannot be read, so no change is made (code registry_unavailable)."
SPECIAL: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {
    ("GET /ready", 503): (
        "The server is starting or stopping, or its engine is not running (code not_ready).",
        {},
    ),
    ("POST /admin/canary", 503): (_AUDIT_503, HEADERS[503]),
    ("POST /admin/canary/rollback", 503): (_AUDIT_503, HEADERS[503]),
}
SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant's API key, as `Authorization: Bearer KEY`. A server with no tenants "
        "configured takes any key, or none.",
    },
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin key (serve.yaml admin_key), as `Authorization: Bearer KEY`.",
    },
}


def install_openapi(app: FastAPI, access: Access) -> None:
    """Serve an /openapi.json that describes what the server really answers: see `describe`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, on the first request, when every route is added
            schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = describe(schema, access)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe(schema: dict[str, Any], access: Access) -> dict[str, Any]:
    """FastAPI's schema with each operation's real error responses (its 422s removed), the error body
    as components.schemas.Error, the security schemes, and streaming as a second type of the
    completions' 200."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _describe_operation(f"{method.upper()} {path}", operation, access)
    return schema


def _describe_operation(name: str, operation: dict[str, Any], access: Access) -> None:
    """Document the errors operation `name` ("POST /v1/completions") answers with, and its keys."""
    path = name.partition(" ")[2]
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    prefix = next((p for p in _BY_PREFIX if path.startswith(p)), None)
    statuses = set(ERRORS.get(name, _BY_PREFIX[prefix] if prefix else ()))
    statuses |= {500} | ({400} if "requestBody" in operation else set())
    statuses -= _auth_statuses_not_sent(prefix, access)
    for status in sorted(statuses):
        description, headers = SPECIAL.get((name, status), (DESCRIPTIONS[status], HEADERS.get(status, {})))
        responses[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            **({"headers": headers} if headers else {}),
        }
    if prefix == "/admin/":
        operation["security"] = [{"adminKey": []}]
    elif prefix == "/v1/":  # `{}`: with no tenants configured, a request without a key is served too
        operation["security"] = [{"apiKey": []}] if access.enabled else [{"apiKey": []}, {}]
    if name in ("POST /v1/completions", "POST /v1/chat/completions"):
        ok = responses.get("200", {}).setdefault("content", {})
        ok["text/event-stream"] = {"schema": STREAM_EVENT}


def _auth_statuses_not_sent(prefix: str | None, access: Access) -> set[int]:
    """The key errors this server never answers with: 401 on /v1 without tenants (any key passes);
    on /admin, 401 without an admin key (every call is a 403) and 403 with one."""
    if prefix == "/v1/":
        return set() if access.enabled else {401}
    if prefix == "/admin/":
        return {403} if access.admin is not None else {401}
    return set()
