"""The admin API, behind its own key (serve.yaml `admin_key`; without one every /admin call is a 403):
adapters loaded into or dropped from the engine's slots at run time, the cache state, and the routes'
canary splits, each change of a split written to the registry's audit log.

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

from ..errors import RequestError
from .catalog import Catalog, ModelNotFoundError
from .http import ApiError
from .tenants import Access, Routes, Split, audit_route
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
    """Add the /admin endpoints to `app`."""

    async def admin(request: Request) -> None:
        access.check_admin(request.headers.get("authorization", ""))

    guard = [Depends(admin)]
    changing = asyncio.Lock()  # one route change at a time: its audit entry names the split it replaced

    async def key_of(model: str) -> str:
        try:
            target = await run_in_threadpool(catalog.resolve, model)
        except ModelNotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        if target.key is None:
            raise ApiError(400, "the base model is always loaded", param="model")
        return target.key

    @app.get("/admin/adapters", dependencies=guard)
    async def adapters() -> dict[str, Any]:
        listed = await run_in_threadpool(_adapters, engine, catalog)
        return {"object": "list", "data": listed, "stats": engine.stats(), "routes": routes.listed()}

    @app.post("/admin/adapters/load", dependencies=guard)
    async def load(req: AdapterRequest) -> dict[str, Any]:
        key = await key_of(req.model)
        await engine.load(key)  # AdapterLoadError: 400 adapter_load_failed
        log.info("admin: loaded %s", key)
        return {"model": req.model, "key": key, "loaded": True}

    @app.post("/admin/adapters/unload", dependencies=guard)
    async def unload(req: AdapterRequest) -> dict[str, Any]:
        key = await key_of(req.model)
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

    @app.get("/admin/routes", dependencies=guard)
    async def list_routes() -> dict[str, Any]:
        return {"routes": routes.listed(), "default_aliases": sorted(routes.default_aliases)}

    async def change(name: str, after: Split, user: str | None, reason: str) -> dict[str, Any]:
        for part in ("stable", "canary"):
            target = getattr(after, part)
            if target is not None:
                try:
                    await run_in_threadpool(catalog.resolve, target)
                except ModelNotFoundError:
                    raise ApiError(400, f"{part}: {target!r} names no served model", param=part) from None
        before = routes.splits.get(name)
        entry = None
        if catalog.registry is not None:  # the record first: a change is never made without it
            entry = await run_in_threadpool(
                audit_route, catalog.registry, name, before, after, user or "admin", reason
            )
        else:
            log.warning("route %s changed with no registry open: no audit entry was written", name)
        routes.splits[name] = after
        log.info("admin: route %s is now %s", name, after.to_dict())
        return {"route": name, **after.to_dict(), "audit": entry}

    @app.post("/admin/canary", dependencies=guard)
    async def canary(req: CanaryRequest) -> dict[str, Any]:
        async with changing:
            before = routes.splits.get(req.route)
            if before is None:
                _new_route_name(req.route, catalog, routes)
                if req.stable is None:
                    raise ApiError(404, f"no route {req.route!r}; give stable to create it", param="route")
            given = req.model_fields_set
            stable = req.stable if req.stable is not None else before.stable  # type: ignore[union-attr]
            canary = req.canary if "canary" in given else (before.canary if before else None)
            percent = req.canary_percent if req.canary_percent is not None else None
            if percent is None:
                percent = 0.0 if canary is None or before is None else before.canary_percent
            try:
                after = Split(stable, canary, percent)
            except RequestError as e:
                raise ApiError(400, str(e), param="canary_percent") from None
            return await change(req.route, after, req.user, req.reason)

    @app.post("/admin/canary/rollback", dependencies=guard)
    async def rollback(req: RollbackRequest) -> dict[str, Any]:
        async with changing:
            before = routes.splits.get(req.route)
            if before is None:
                raise ApiError(404, f"no route {req.route!r}", param="route")
            return await change(req.route, Split(before.stable, before.canary, 0.0), req.user, req.reason)


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
