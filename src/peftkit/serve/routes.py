"""Routes: a name a request may use for a model that is an alias of another (`chat: beta`) or a canary
split sticky per user (`support: {stable: bot@3, canary: bot@4, canary_percent: 10}`), and the default
aliases that mean "the caller's default adapter".

    routes = Routes.from_config(config.routes, config.default_aliases)
    routes.follow(registry, catalog)          # the splits the admin API set, on any server, survive
    target = route("support", caller, routes, catalog, user="u-17")
    target.model                              # "bot@4" for a user in the canary

serve.yaml gives each route's first split. Once the admin API changes a split, the change is an entry in
the registry's audit log (action "route", the split before and after), and that log is what every server
on the registry routes by: a server that starts reads the newest entry of each route (it beats
serve.yaml's split), and a running one reads the entries written since its last read at most every
REFRESH_SECONDS (see `Routes.refresh`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PeftkitError, RequestError
from .catalog import Catalog, ModelNotFoundError, Target, not_found

if TYPE_CHECKING:
    from .tenants import Caller

log = logging.getLogger("peftkit.serve")
BUCKETS = 10_000  # a user's canary bucket: percentages have two decimals
REFRESH_SECONDS = 2.0  # how stale a running server's splits may be after another server changed one


# -- configuration values (shared with tenants.py) ------------------------------------------------
def _mapping(value: Any, where: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where} must be a mapping with text keys, found {value!r:.60}")
    extra = set(value) - set(allowed) if allowed is not None else set()
    if extra:
        raise ConfigError(f"unknown key {where}.{sorted(extra)[0]}; valid keys: {', '.join(allowed or ())}")
    return dict(value)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigError(
            f"{where} must be a model name (text without surrounding spaces), found {value!r:.60}"
        )
    return value


# -- splits ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """A route: `stable` serves everyone but the `canary_percent` of users sent to `canary`. A route
    with no canary is an alias. Each target is a model name the catalog resolves (never a route)."""

    stable: str
    canary: str | None = None
    canary_percent: float = 0.0

    def __post_init__(self) -> None:
        p = self.canary_percent
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise RequestError(f"canary_percent must be a number from 0 to 100, not {p!r}")
        if p and self.canary is None:
            raise RequestError("canary_percent is above 0 but no canary version is given")

    def choose(self, route: str, user: str | None) -> str:
        """The target for one request: sticky per `user` (their bucket, from a hash of the route and
        the user, is below the percentage or not), random when there is no user."""
        if self.canary is None or self.canary_percent <= 0:
            return self.stable
        draw = random.random() * BUCKETS if user is None else user_bucket(route, user)
        return self.canary if draw < self.canary_percent * BUCKETS / 100 else self.stable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def user_bucket(route: str, user: str) -> int:
    """0 <= bucket < BUCKETS for a user on a route: stable across requests and servers; raising the
    percentage keeps everyone already in the canary there."""
    digest = hashlib.sha256(f"{route}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass
class _AuditFeed:
    """Where a Routes reads the splits the admin API set: the registry's audit log, from entry `seq` on."""

    registry: Any
    catalog: Catalog
    every: float
    seq: int = 0  # the newest audit entry read
    due: float = 0.0  # time.monotonic() of the next read
    lock: threading.Lock = field(default_factory=threading.Lock)


class Routes:
    """The routes by name, and the model names that mean "the caller's default adapter".

    `splits` is replaced whole on every change, never changed in place, so a reader can iterate the
    dict it got while a change lands."""

    def __init__(self, splits: dict[str, Split] | None = None, default_aliases: Iterable[str] = ()) -> None:
        self.splits = dict(splits or {})
        self.default_aliases = frozenset(default_aliases)
        self._feed: _AuditFeed | None = None
        self._putting = threading.Lock()  # the admin API and a refresh may both put

    @classmethod
    def from_config(cls, routes: Any, default_aliases: Any) -> Routes:
        """serve.yaml's `routes` (NAME: TARGET, or NAME: {stable, canary, canary_percent}) and
        `default_aliases` (a list of names)."""
        splits = {}
        for name, value in _mapping(routes, "routes").items():
            where = f"routes.{name}"
            _route_name(name, where)
            if isinstance(value, str):
                value = {"stable": value}
            data = _mapping(value, where, ("stable", "canary", "canary_percent"))
            try:
                splits[name] = Split(
                    _name(data.get("stable"), f"{where}.stable"),
                    None if data.get("canary") is None else _name(data["canary"], f"{where}.canary"),
                    data.get("canary_percent", 0.0),
                )
            except RequestError as e:
                raise ConfigError(f"{where}: {e}") from None
        if not isinstance(default_aliases, (list, tuple)):
            raise ConfigError(f"default_aliases must be a list of model names, found {default_aliases!r:.60}")
        aliases = [_name(a, f"default_aliases[{i}]") for i, a in enumerate(default_aliases)]
        return cls(splits, aliases)

    def check(self, catalog: Catalog) -> None:
        """Every route's name is free and each target resolves (a ConfigError names the one that does not)."""
        for name, split in self.splits.items():
            problem = _unservable(name, split, catalog, self.default_aliases)
            if problem is not None:
                raise ConfigError(f"routes.{name}{problem}")

    def put(self, name: str, split: Split) -> None:
        """Set one route's split (in this process only; the admin API audits it first)."""
        with self._putting:
            self.splits = {**self.splits, name: split}

    def get(self, name: str) -> Split | None:
        """The route's split, read after `refresh` (so at most REFRESH_SECONDS old)."""
        self.refresh()
        return self.splits.get(name)

    def listed(self) -> dict[str, dict[str, Any]]:
        self.refresh()
        return {name: split.to_dict() for name, split in self.splits.items()}

    def follow(self, registry: Any, catalog: Catalog, every: float = REFRESH_SECONDS) -> None:
        """Route by the registry's audit log from now on: its newest entry of each route is read now
        (and beats serve.yaml's split), newer ones by `refresh`. Following the same registry again
        changes nothing."""
        if self._feed is not None and self._feed.registry is registry:
            return
        self._feed = _AuditFeed(registry, catalog, every)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Apply the audit entries written since the last read, when REFRESH_SECONDS have passed (or
        `force`). A read is one query over the log's newest entries (by its key, `seq`), so it is cheap,
        but not free enough for every request, and a server cannot be told that another one wrote an
        entry (the registry may be another machine's PostgreSQL): reading on the first request after the
        interval bounds the staleness and costs one query per interval, and an idle server reads nothing.
        While another thread reads, callers use the splits they have. A failed read is logged and the
        splits kept, unless `force` (the admin API must not write over what it could not read)."""
        feed = self._feed
        if feed is None or (not force and time.monotonic() < feed.due):
            return
        if not feed.lock.acquire(blocking=force):
            return
        try:
            feed.due = time.monotonic() + feed.every
            try:
                entries = _route_entries(feed.registry, feed.seq)
            except PeftkitError as e:
                if force:
                    raise
                log.warning("routes: cannot read the registry's audit log (%s); keeping the splits", e)
                return
            for seq, name, details in entries:
                self._apply(seq, name, details, feed.catalog)
                feed.seq = seq
        finally:
            feed.lock.release()

    def _apply(self, seq: int, name: str, details: Any, catalog: Catalog) -> None:
        """One audit entry's split, if this server can serve it (a server with other --adapters may not)."""
        after = details.get("after") if isinstance(details, dict) else None
        try:
            split = Split(after["stable"], after.get("canary"), after.get("canary_percent", 0.0))  # type: ignore[index, union-attr]
        except (TypeError, KeyError, AttributeError, RequestError):
            log.warning("routes: audit entry %d for route %s holds no split; skipped", seq, name)
            return
        problem = _unservable(name, split, catalog, self.default_aliases)
        if problem is not None:
            log.warning("routes: audit entry %d for route %s skipped on this server: %s", seq, name, problem)
            return
        if self.splits.get(name) != split:
            log.info("routes: route %s is now %s (audit entry %d)", name, split.to_dict(), seq)
            self.put(name, split)


def _unservable(name: str, split: Split, catalog: Catalog, aliases: frozenset[str]) -> str | None:
    """Why this server cannot serve `split` as route `name` (a message starting at the field), or None."""
    if name in catalog.base_names or name in catalog.adapters or name in aliases:
        return ": the name is already the base model's or an adapter's"
    for part in ("stable", "canary"):
        target = getattr(split, part)
        if target is None and part == "canary":
            continue
        if not isinstance(target, str):
            return f".{part}: {target!r} is not a model name"
        try:
            key = catalog.resolve(target).key
        except ModelNotFoundError:
            return f".{part}: {target!r} names no served model"
        if _other_base(catalog, key):
            return f".{part}: {target!r} was trained on another base model than this server's"
    return None


def _other_base(catalog: Catalog, key: str | None) -> bool:
    """Whether registry version `key` was recorded for another base than the catalog's: one registry
    may hold adapters of several bases, and a split set on a server of one base is not another's."""
    if key is None or catalog.registry is None or "@" not in key or not catalog.base_fingerprint:
        return False
    from ..registry.refs import parse_ref

    recorded = catalog.registry.resolve_version(parse_ref(key)).base_fingerprint
    return bool(recorded) and recorded != catalog.base_fingerprint


def _route_entries(registry: Any, after: int) -> list[tuple[int, str, Any]]:
    """(seq, route, details) of each "route" audit entry after entry `after`, oldest first. One query
    by the audit table's key; Registry.history would read and parse the whole log."""
    with registry.db.transaction() as tx:
        rows = tx.execute(
            "SELECT seq, name, details FROM audit WHERE action = 'route' AND seq > ? ORDER BY seq", (after,)
        )
    entries = []
    for seq, name, details in rows:
        try:
            entries.append((seq, name, json.loads(details)))
        except (TypeError, ValueError):  # not this server's to repair: skipped (with a warning) by _apply
            entries.append((seq, name, None))
    return entries


def _route_name(name: str, where: str) -> str:
    from ..registry.refs import check_name

    try:
        return check_name(name)
    except RequestError as e:
        raise ConfigError(f"{where}: {e}") from None


# -- requests -------------------------------------------------------------------------------------
def route(model: str, caller: Caller, routes: Routes, catalog: Catalog, user: str | None = None) -> Target:
    """What a request's `model` runs on for `caller`. The base model's names and the default aliases
    give the caller's default adapter (else the base); a route gives its stable or canary target; any
    other name goes to the catalog. A name the caller may not use is "not found" before any lookup,
    and every "not found" lists the names this caller may use (what its /v1/models lists, so nothing
    about another tenant's names is revealed). The returned target's `model` is the concrete name
    that served, for the response."""
    try:
        return _route(model, caller, routes, catalog, user)
    except ModelNotFoundError as e:
        try:
            usable = [m["id"] for m in models_for(caller, routes, catalog)]
        except PeftkitError:  # the registry cannot list its names now: the 404 is still the answer
            raise e from None
        raise ModelNotFoundError(f"{e} {usable_names(usable)}") from None


def usable_names(usable: list[str], most: int = 20) -> str:
    """ "Models you can use: `a`, `b`." for a 404's message (at most `most` names). The same for every
    name the caller asks for: the answer for another tenant's name is the answer for a missing one."""
    shown = ", ".join(f"`{n}`" for n in usable[:most])
    more = f" and {len(usable) - most} more (GET /v1/models lists them all)" if len(usable) > most else ""
    return f"Models you can use: {shown}{more}."


def _route(model: str, caller: Caller, routes: Routes, catalog: Catalog, user: str | None) -> Target:
    if model in catalog.base_names or model in routes.default_aliases:
        if caller.default is None:
            return Target(catalog.base_names[0] if model in routes.default_aliases else model, None)
        model = caller.default  # the operator chose it for this key: no permission check
    elif not caller.may_use(model.partition("@")[0]):
        raise ModelNotFoundError(not_found(model))
    split = routes.get(model)
    if split is None:
        return catalog.resolve(model)
    chosen = split.choose(model, user)
    return Target(chosen, catalog.resolve(chosen).key)


def models_for(caller: Caller, routes: Routes, catalog: Catalog) -> list[dict[str, Any]]:
    """The /v1/models list a caller sees: the base, and of the adapters and routes only those the
    caller may use (everything when no keys are configured)."""
    listed = catalog.models()
    base = listed[0]
    names = [m["id"] for m in listed[1:]] + [r for r in routes.listed() if r not in catalog.adapters]
    names = [n for n in dict.fromkeys(names) if caller.may_use(n)]
    return [base] + [{**base, "id": n, "root": n, "parent": base["id"]} for n in names]


def audit_route(
    registry: Any, name: str, before: Split | None, after: Split, user: str, reason: str
) -> dict[str, Any]:
    """Write a `route` entry (the split before and after) to the registry's audit log; the entry.
    Its version is the canary's registry version number when there is one."""
    from ..registry.refs import parse_ref

    version = None
    if after.canary is not None:
        try:
            version = registry.resolve_version(parse_ref(after.canary)).number
        except PeftkitError:
            version = None  # a configured adapter, not a registry version
    details = {"before": before.to_dict() if before else None, "after": after.to_dict(), "reason": reason}
    return registry.record("route", name, version, details, user=user).to_dict()
