"""The admin API, behind its own key (serve.yaml `admin_key`; without one every /admin call is a 403):
adapters loaded into or dropped from the engine's slots at run time, the cache state, and the routes'
canary splits, each change of a split written to the registry's audit log, which every server on the
registry routes by (a restarted one too; routes.py says how soon a running one sees it).

    GET  /admin/adapters                 every servable adapter: loaded or not, its slot, requests
    POST /admin/adapters/load            {"model": "support-bot@4"}
    POST /admin/adapters/unload          {"model": "support-bot@3"}
    GET  /admin/routes                   the routes and their splits
    POST /admin/canary                   {"route": "support", "canary": "support-bot@4", "canary_percent": 10}
    POST /admin/canary/rollback          {"route": "support", "reason": "errors up"}: everyone on stable

Adapters are named as requests name them (a configured name or a registry reference), never by a path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import PeftkitError, RequestError
from .apierrors import ApiError
from .catalog import Catalog, ModelNotFoundError
from .routes import Routes, Split, audit_route
from .tenants import Access
from .types import AdapterBusyError, AdapterNotLoadedError

log = logging.getLogger("peftkit.serve")


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


class CanaryRequest(BaseModel):
    """A change to one route; fields left out keep their value ("canary": null removes the canary)."""

    model_config = ConfigDict(extra="forbid")
    route: str
    stable: str | None = None
    canary: str | None = None
    canary_percent: float | None = Field(None, ge=0, le=100)
    reason: str = ""
    user: str | None = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    route: str
    reason: str = ""
    user: str | None = None


def install_admin(app: FastAPI, engine: Any, catalog: Catalog, access: Access, routes: Routes) -> None:
    """Add the /admin endpoints to `app`. With a registry open, `routes` follow its audit log from now
    on (`Routes.follow`): a split set here, by this server or another on the registry, survives a
    restart and reaches every server on the registry."""
    if catalog.registry is not None:
        routes.follow(catalog.registry, catalog)

    async def admin(request: Request) -> None:
        access.check_admin(request.headers.get("authorization", ""))

    guard = [Depends(admin)]
    _install_adapters(app, guard, engine, catalog, routes)
    _install_routes(app, guard, catalog, routes)


def _install_adapters(app: FastAPI, guard: list[Any], engine: Any, catalog: Catalog, routes: Routes) -> None:
    """GET /admin/adapters, POST /admin/adapters/load and /admin/adapters/unload."""

    @app.get("/admin/adapters", dependencies=guard)
    async def adapters() -> dict[str, Any]:
        listed = await run_in_threadpool(_adapters, engine, catalog)
        splits = await run_in_threadpool(routes.listed)  # (it may read the audit log)
        return {"object": "list", "data": listed, "stats": engine.stats(), "routes": splits}

    @app.post("/admin/adapters/load", dependencies=guard)
    async def load(req: AdapterRequest) -> dict[str, Any]:
        key = await _key_of(catalog, req.model)
        await engine.load(key)  # AdapterLoadError: 400 adapter_load_failed
        log.info("admin: loaded %s", key)
        return {"model": req.model, "key": key, "loaded": True}

    @app.post("/admin/adapters/unload", dependencies=guard)
    async def unload(req: AdapterRequest) -> dict[str, Any]:
        key = await _key_of(catalog, req.model)
        try:
            await engine.unload(key)
        except AdapterNotLoadedError:
            raise ApiError(
                404, f"adapter {key} is not loaded", param="model", code="adapter_not_loaded"
            ) from None
        except AdapterBusyError as e:  # requests still use it
            raise ApiError(409, str(e), param="model", code="adapter_busy") from None
        log.info("admin: unloaded %s", key)
        return {"model": req.model, "key": key, "loaded": False}


async def _key_of(catalog: Catalog, model: str) -> str:
    """The engine key of the adapter `model` names (404 for none, 400 for the base model)."""
    try:
        target = await run_in_threadpool(catalog.resolve, model)
    except ModelNotFoundError as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    if target.key is None:
        raise ApiError(400, "the base model is always loaded", param="model")
    return target.key


def _install_routes(app: FastAPI, guard: list[Any], catalog: Catalog, routes: Routes) -> None:
    """GET /admin/routes, POST /admin/canary and /admin/canary/rollback."""
    changing = asyncio.Lock()  # one route change at a time: its audit entry names the split it replaced

    @app.get("/admin/routes", dependencies=guard)
    async def list_routes() -> dict[str, Any]:
        listed = await run_in_threadpool(routes.listed)
        return {"routes": listed, "default_aliases": sorted(routes.default_aliases)}

    @app.post("/admin/canary", dependencies=guard)
    async def canary(req: CanaryRequest) -> dict[str, Any]:
        async with changing:
            await _read_audit(routes)
            before = routes.splits.get(req.route)
            if before is None:
                _new_route_name(req.route, catalog, routes)
                if req.stable is None:
                    raise ApiError(404, f"no route {req.route!r}; give stable to create it", param="route")
            return await _change(catalog, routes, req.route, _next_split(req, before), req.user, req.reason)

    @app.post("/admin/canary/rollback", dependencies=guard)
    async def rollback(req: RollbackRequest) -> dict[str, Any]:
        async with changing:
            await _read_audit(routes)
            before = routes.splits.get(req.route)
            if before is None:
                raise ApiError(404, f"no route {req.route!r}", param="route")
            after = Split(before.stable, before.canary, 0.0)
            return await _change(catalog, routes, req.route, after, req.user, req.reason)


def _next_split(req: CanaryRequest, before: Split | None) -> Split:
    """The split a canary request asks for: the fields it gives, the others kept from `before`."""
    stable = req.stable if req.stable is not None else before.stable  # type: ignore[union-attr]
    canary = req.canary if "canary" in req.model_fields_set else (before.canary if before else None)
    percent = req.canary_percent
    if percent is None:
        percent = 0.0 if canary is None or before is None else before.canary_percent
    try:
        return Split(stable, canary, percent)
    except RequestError as e:
        raise ApiError(400, str(e), param="canary_percent") from None


async def _read_audit(routes: Routes) -> None:
    """Bring `routes` up to the audit log before a change, so its entry names the split it replaces
    even when another server made the last change (503 when the registry cannot be read)."""
    try:
        await run_in_threadpool(routes.refresh, True)
    except PeftkitError as e:
        raise ApiError(
            503,
            f"cannot read the registry's audit log: {e}",
            kind="server_error",
            code="registry_unavailable",
            headers={"Retry-After": "1"},
        ) from None


async def _change(
    catalog: Catalog, routes: Routes, name: str, after: Split, user: str | None, reason: str
) -> dict[str, Any]:
    """Check `after`'s targets, write its audit entry, then route by it; the response body."""
    for part in ("stable", "canary"):
        target = getattr(after, part)
        if target is not None:
            try:
                await run_in_threadpool(catalog.resolve, target)
            except ModelNotFoundError:
                raise ApiError(400, f"{part}: {target!r} names no served model", param=part) from None
    before = routes.splits.get(name)
    entry = None
    if catalog.registry is None:
        log.warning("route %s changed with no registry open: no audit entry was written", name)
    else:  # the record first: a change is never made without it
        try:
            entry = await run_in_threadpool(
                audit_route, catalog.registry, name, before, after, user or "admin", reason
            )
        except PeftkitError as e:  # not recorded, so not made
            raise ApiError(503, f"cannot write the registry's audit log: {e}", kind="server_error",
                           code="registry_unavailable", headers={"Retry-After": "1"}) from None  # fmt: skip
    routes.put(name, after)
    if entry is not None:  # and read back with what others wrote before it, so the newest entry wins
        try:
            await run_in_threadpool(routes.refresh, True)
        except PeftkitError as e:  # the split above stands; the next refresh reads the log again
            log.warning("route %s: cannot read the audit log back (%s)", name, e)
    log.info("admin: route %s is now %s", name, after.to_dict())
    return {"route": name, **after.to_dict(), "audit": entry}


def _new_route_name(name: str, catalog: Catalog, routes: Routes) -> None:
    from ..registry.refs import check_name

    try:
        check_name(name)
    except RequestError as e:
        raise ApiError(400, str(e), param="route") from None
    if name in catalog.base_names or name in catalog.adapters or name in routes.default_aliases:
        raise ApiError(400, f"{name!r} is the base model's or an adapter's name", param="route")


def _adapters(engine: Any, catalog: Catalog) -> list[dict[str, Any]]:
    """Every adapter the server can serve (configured, then registry versions) and every resident one:
    loaded or not, its slot and the requests using it."""
    resident = {a["key"]: a for a in engine.adapters()}
    rows = {k: {"id": k, "source": "configured", "stage": None} for k in catalog.adapters}
    if catalog.registry is not None:
        for v in catalog.registry.versions():
            rows.setdefault(v.ref, {"id": v.ref, "source": "registry", "stage": v.stage})
    for k in resident:
        rows.setdefault(k, {"id": k, "source": "unknown", "stage": None})
    out = []
    for k, row in rows.items():
        slot = resident.get(k)
        out.append(
            {
                **row,
                "loaded": slot is not None,
                "slot": slot and slot["slot"],
                "requests": slot and slot["requests"],
            }
        )
    return out
