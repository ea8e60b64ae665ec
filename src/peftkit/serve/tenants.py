"""Who may call the server: API keys (stored as sha256 hashes), tenants and the models each may use,
and per-key rate limits. Everything here is parsed from serve.yaml and checked before the model loads;
a wrong value names its place (`tenants.acme.keys[0]`). Routes (aliases, canary splits) are in
routes.py; their names are re-exported here for the modules that import them from here.

    access = Access.from_config(admin_key, tenants, rate_limit)
    caller = access.authenticate(request.headers.get("authorization", ""))  # AuthError: 401
    access.admit(caller, cost=req.n)                      # RateLimitedError: 429 with Retry-After

A tenant's permission is checked on the name alone, before any lookup, so a name the tenant may not use
gets the very 404 a missing one gets, in the same time whether it exists or not.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PeftkitError
from .routes import (  # noqa: F401 (re-exported: http.py, admin.py and commands.py import them from here)
    BUCKETS,
    Routes,
    Split,
    _mapping,
    _name,
    audit_route,
    models_for,
    route,
    user_bucket,
)
from .types import ParamError

HASHED = re.compile(r"sha256:[0-9a-f]{64}")
MAX_RATE_KEYS = 100_000  # token buckets kept (least recently used dropped): any key is one when none are set


def hash_key(key: str) -> str:
    """How a key is written in serve.yaml: "sha256:" and the hex digest of its UTF-8 bytes
    (`peftkit serve --hash-key` prints it)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class AuthError(PeftkitError):
    """A missing or wrong API key (HTTP 401); `admin` for the admin API's key."""

    def __init__(self, message: str, admin: bool = False) -> None:
        super().__init__(message)
        self.admin = admin


class AdminDisabledError(PeftkitError):
    """The admin API is called, but no admin_key is configured (HTTP 403)."""


class RateLimitedError(PeftkitError):
    """The key sent more requests than its rate limit (HTTP 429); `retry_after` in whole seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateLimit:
    """A token bucket of sequences (a request with n choices takes n): up to `burst` at once, refilled
    at requests_per_minute / 60 a second."""

    requests_per_minute: float
    burst: int


@dataclass(frozen=True)
class Tenant:
    """One customer: the model names its keys may use (adapter or route names; any version of an
    adapter name), its default adapter, and its rate limit (else the server's)."""

    name: str
    models: frozenset[str]
    default: str | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Caller:
    """Who sent a request: their tenant (None when no keys are configured), the id of their rate
    bucket (the key's hash) and their default adapter (the key's own, else the tenant's)."""

    tenant: Tenant | None
    bucket: str
    default: str | None = None

    def may_use(self, name: str) -> bool:
        tenant = self.tenant
        return tenant is None or name in tenant.models or name == self.default


def _model_name(value: Any, where: str) -> str:
    """A name a tenant may use: an adapter or route name, never one version (allowing a name allows
    all its versions, and a reference like bot@3 would never match a request's name)."""
    name = _name(value, where)
    if "@" in name:
        raise ConfigError(
            f"{where} is {name!r}: list the adapter's name ({name.partition('@')[0]!r}); a tenant that may use "
            "a name may use each of its versions"
        )
    return name


def parse_rate_limit(value: Any, where: str) -> RateLimit | None:
    """`{requests_per_minute: N, burst: M}` (burst defaults to N, at least 1); None for null."""
    if value is None:
        return None
    data = _mapping(value, where, ("requests_per_minute", "burst"))
    rpm, burst = data.get("requests_per_minute"), data.get("burst")
    if isinstance(rpm, bool) or not isinstance(rpm, (int, float)) or not (math.isfinite(rpm) and rpm > 0):
        raise ConfigError(f"{where}.requests_per_minute must be a number above 0, found {rpm!r}")
    if burst is None:
        burst = max(1, math.floor(rpm))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ConfigError(f"{where}.burst must be a whole number of at least 1, found {burst!r}")
    return RateLimit(float(rpm), burst)


def _hashed(value: Any, where: str) -> str:
    if not isinstance(value, str) or not HASHED.fullmatch(value):
        raise ConfigError(
            f"{where} must be a key's hash, sha256:<64 hex digits>; keys are never written in plain text "
            "(hash one with `peftkit serve --hash-key` and give it the key on stdin)"
        )
    return value


def _tenant(name: str, value: Any) -> tuple[Tenant, list[tuple[str, str | None, str]]]:
    where = f"tenants.{name}"
    data = _mapping(value, where, ("keys", "models", "default", "rate_limit"))
    models = data.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"{where}.models must be a list of model names, found {models!r:.60}")
    default = None if data.get("default") is None else _name(data["default"], f"{where}.default")
    tenant = Tenant(
        name,
        frozenset(_model_name(m, f"{where}.models[{i}]") for i, m in enumerate(models)),
        default,
        parse_rate_limit(data.get("rate_limit"), f"{where}.rate_limit"),
    )
    keys = data.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{where}.keys must list at least one hashed key (sha256:...)")
    out = []
    for i, key in enumerate(keys):
        at = f"{where}.keys[{i}]"
        if isinstance(key, Mapping):
            entry = _mapping(key, at, ("hash", "default"))
            own = None if entry.get("default") is None else _name(entry["default"], f"{at}.default")
            out.append((_hashed(entry.get("hash"), f"{at}.hash"), own, at))
        else:
            out.append((_hashed(key, at), None, at))
    return tenant, out


# -- access ---------------------------------------------------------------------------------------
class Access:
    """The configured keys, the admin key and the rate limits; `enabled` when tenants are configured."""

    def __init__(
        self,
        keys: list[tuple[bytes, Tenant, str | None]],
        admin: bytes | None,
        rate_limit: RateLimit | None,
    ) -> None:
        self.keys = keys  # (sha256 digest, tenant, the key's own default)
        self.admin = admin
        self.rate_limit = rate_limit
        self.tenants = list({id(t): t for _, t, _ in keys}.values())
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # bucket -> (tokens, at)
        self.lock = threading.Lock()

    @classmethod
    def from_config(cls, admin_key: str | None, tenants: Any, rate_limit: Any) -> Access:
        """Parse serve.yaml's admin_key (a key or its sha256:... hash), tenants and rate_limit."""
        entries: list[tuple[bytes, Tenant, str | None]] = []
        seen: dict[str, str] = {}
        for name, value in _mapping(tenants, "tenants").items():
            tenant, keys = _tenant(_name(name, "a tenant's name"), value)
            for digest, own, at in keys:
                if digest in seen:
                    raise ConfigError(f"{at} is the same key as {seen[digest]}; give each key once")
                seen[digest] = at
                entries.append((bytes.fromhex(digest.removeprefix("sha256:")), tenant, own))
        admin = None
        if admin_key is not None:
            if not isinstance(admin_key, str) or not admin_key.strip():
                raise ConfigError("admin_key must be the admin key or its hash (sha256:...), or null")
            digest = admin_key if HASHED.fullmatch(admin_key) else hash_key(admin_key)
            if digest in seen:
                raise ConfigError(
                    f"admin_key is the same key as {seen[digest]}; the admin key must be its own"
                )
            admin = bytes.fromhex(digest.removeprefix("sha256:"))
        return cls(entries, admin, parse_rate_limit(rate_limit, "rate_limit"))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str) -> Caller:
        """The caller a request's `Authorization: Bearer KEY` header names. The key's hash is compared
        with every configured hash (hmac.compare_digest, no early exit), so the time taken does not
        say which key, if any, was close."""
        key = _bearer(authorization)
        digest = hashlib.sha256((key or "").encode()).digest()
        if not self.enabled:
            return Caller(None, digest.hex())
        found = None
        for known, tenant, own in self.keys:
            if hmac.compare_digest(digest, known):
                found = (tenant, own)
        if key is None:
            raise AuthError("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        if found is None:
            raise AuthError("Incorrect API key provided.")
        tenant, own = found
        return Caller(tenant, digest.hex(), own or tenant.default)

    def check_admin(self, authorization: str) -> None:
        """Pass the admin key, or raise: AdminDisabledError without one configured, else AuthError."""
        if self.admin is None:
            raise AdminDisabledError(
                "the admin API is disabled: no admin_key is configured (set admin_key in serve.yaml)"
            )
        key = _bearer(authorization)
        digest = hashlib.sha256((key or "").encode()).digest()
        if not hmac.compare_digest(digest, self.admin) or key is None:
            raise AuthError(
                "the admin API needs the admin key: 'Authorization: Bearer ADMIN_KEY'", admin=True
            )

    def admit(self, caller: Caller, cost: int = 1, now: float | None = None) -> None:
        """Take `cost` tokens, one per sequence the request generates (its n choices, times its
        prompts), from the caller's bucket: n=8 costs the server what eight requests do. Nothing is
        taken from a bucket that holds too few: RateLimitedError, with the seconds until it holds
        enough. A cost above the bucket's burst could never pass: ParamError (400) on `n`."""
        limit = caller.tenant.rate_limit if caller.tenant and caller.tenant.rate_limit else self.rate_limit
        if limit is None:
            return
        if cost > limit.burst:
            raise ParamError(
                f"this request asks for {cost} sequences, but this key's rate limit allows at most "
                f"{limit.burst} at once; ask for fewer choices (n) or prompts",
                "n",
            )
        now = time.monotonic() if now is None else now
        rate = limit.requests_per_minute / 60.0  # tokens per second
        with self.lock:
            tokens, at = self.buckets.pop(caller.bucket, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - at) * rate)
            admitted = tokens >= cost
            self.buckets[caller.bucket] = (tokens - cost if admitted else tokens, now)
            while len(self.buckets) > MAX_RATE_KEYS:
                self.buckets.popitem(last=False)
        if not admitted:
            wait = max(1, math.ceil((cost - tokens) / rate - 1e-9))  # (20.000000000000004 s is 20)
            raise RateLimitedError(
                f"Rate limit reached: {limit.requests_per_minute:g} sequences per minute for this key "
                f"(a request costs one per choice). Try again in {wait} s.",
                wait,
            )


def _bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
