"""Canary splits live in the registry's audit log, so every server on one registry routes alike: a split
set through one server's admin API is what a server started later uses (a restart, or another process:
nothing but the registry's database is shared between the servers here, each has its own Registry,
catalog and routes), and a server already running picks it up within REFRESH_SECONDS.

Its own registry (the module fixture `setup` of test_serve_tenants, made anew for this module), so the
splits changed here are not the ones test_serve_tenants expects."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from test_serve_tenants import ADMIN, CANARY, KEYS, call, chat, start, tenants_config
from test_serve_tenants import setup as setup  # noqa: F401 (the fixture, for this module's own registry)

from peftkit.registry import Registry
from peftkit.serve.commands import ServeConfig, prepare
from peftkit.serve.routes import Routes, Split
from peftkit.serve.tenants import user_bucket

USERS = [f"shared-{i}" for i in range(40)]


@contextmanager
def running(setup: dict) -> Iterator[tuple[str, object]]:
    """A server over `setup`'s registry, configured as test_serve_tenants' (support at CANARY percent)."""
    from peftkit.serve.engine import EngineConfig

    adapters = [f"{n}={d}" for n, d in setup["dirs"].items()]
    config = ServeConfig(max_tokens=40, shutdown_deadline=2, **tenants_config())
    engine = EngineConfig(max_len=96, max_batch=8)
    prepared = prepare(str(setup["base"]), adapters, str(setup["registry"]), config, engine)
    url, uv, thread = start(prepared)
    try:
        yield url, prepared
    finally:
        uv.should_exit = True
        thread.join(10)


def versions(url: str) -> list[str]:
    """The version `support` serves each of USERS on the server at `url`."""
    out = []
    for user in USERS:
        status, headers, body = chat(url, KEYS["acme"], "support", user=user, max_tokens=1)
        assert status == 200 and headers["x-peftkit-adapter"] == body["model"], body
        out.append(body["model"])
    return out


def by_rule(percent: float) -> list[str]:
    return ["bot@2" if user_bucket("support", u) < percent * 100 else "bot@1" for u in USERS]


def admin(url: str, path: str, body: dict) -> dict:
    status, _, raw = call(url + path, body, ADMIN)
    assert status == 200, raw
    return json.loads(raw)


def test_a_split_set_on_one_server_is_the_split_of_every_server_on_the_registry(setup) -> None:
    assert by_rule(60) != by_rule(CANARY)  # else the test could not tell serve.yaml's split from the audit's
    with running(setup) as (a, _):
        assert versions(a) == by_rule(CANARY)  # nothing in the audit yet: serve.yaml's split
        admin(
            a, "/admin/canary", {"route": "support", "canary_percent": 60, "user": "ops", "reason": "wider"}
        )
        assert versions(a) == by_rule(60)
        with running(setup) as (b, _):  # its serve.yaml says CANARY: the audit's newer split wins
            assert versions(b) == versions(a) == by_rule(60)
            listed = admin(b, "/admin/canary/rollback", {"route": "support", "reason": "from b"})
            assert (
                listed["canary_percent"] == 0 and listed["audit"]["details"]["before"]["canary_percent"] == 60
            )
            assert versions(b) == ["bot@1"] * len(USERS)
            # A hang guard: A reads the log again on its first request once REFRESH_SECONDS passed.
            deadline = time.monotonic() + 900
            while versions(a) != ["bot@1"] * len(USERS):
                assert time.monotonic() < deadline, "server A did not see B's rollback"
                time.sleep(0.2)
        admin(a, "/admin/canary", {"route": "support", "canary_percent": 30})
        assert versions(a) == by_rule(30)
        admin(a, "/admin/canary/rollback", {"route": "support", "reason": "errors up"})
    with running(setup) as (fresh, prepared):  # a restart: the newest entry, the rollback, holds
        assert versions(fresh) == ["bot@1"] * len(USERS)
        routes = json.loads(call(fresh + "/admin/routes", None, ADMIN)[2])["routes"]
        assert routes["support"] == {"stable": "bot@1", "canary": "bot@2", "canary_percent": 0}
    entries = Registry.open(setup["registry"], create=False).history("support")
    assert [e.details["after"]["canary_percent"] for e in entries] == [60, 0, 30, 0]
    assert [e.details["before"]["canary_percent"] for e in entries] == [CANARY, 60, 0, 30]


def test_a_route_created_through_the_admin_api_survives_a_restart(setup) -> None:
    with running(setup) as (a, _):
        admin(
            a, "/admin/canary", {"route": "helper", "stable": "bot@1", "canary": "bot@2", "canary_percent": 5}
        )
    with running(setup) as (b, prepared):
        assert prepared.routes.splits["helper"] == Split("bot@1", "bot@2", 5)
        status, headers, _ = chat(b, "sk-globex", "chat")  # routes from serve.yaml still work
        assert status == 200 and headers["x-peftkit-adapter"] == "beta"


def test_an_audit_split_this_server_cannot_serve_is_skipped_and_the_configured_one_kept(
    setup, caplog
) -> None:
    """Servers on one registry may be configured with other adapters: a split naming one this server
    does not have is skipped (with a warning), never served as a 404 to every user of the route."""
    from peftkit.serve.catalog import Catalog

    reg = Registry.open(setup["registry"], create=False)
    reg.record("route", "elsewhere", None, {"after": {"stable": "gamma"}}, user="t")  # gamma: not here
    reg.record("route", "other", None, {"after": {"stable": "bot@1"}}, user="t")
    reg.record("route", "broken", None, {"after": "not a split"}, user="t")
    routes = Routes({"elsewhere": Split("bot@1")})
    routes.follow(reg, Catalog(["base"], {}, reg))
    assert routes.splits["elsewhere"] == Split("bot@1") and routes.splits["other"] == Split("bot@1")
    assert "broken" not in routes.splits
    assert "'gamma' names no served model" in caplog.text and "holds no split" in caplog.text


def test_a_running_server_reads_the_audit_at_most_once_per_interval(setup, monkeypatch) -> None:
    """Requests between reads cost no query; the first request after the interval reads once."""
    from peftkit.serve import routing
    from peftkit.serve.catalog import Catalog

    reg = Registry.open(setup["registry"], create=False)
    routes = Routes({"support": Split("bot@1")})
    reads = []
    real = routing._route_entries
    monkeypatch.setattr(routing, "_route_entries", lambda r, after: reads.append(after) or real(r, after))
    now = [1000.0]  # routing's clock, moved by hand: the test does not depend on how fast the machine is
    monkeypatch.setattr(routing, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    routes.follow(reg, Catalog(["base"], {}, reg), every=1.0)
    assert reads == [0]
    for _ in range(100):  # within the interval
        routes.get("support")
    assert len(reads) == 1
    reg.record("route", "support", 2, {"after": Split("bot@2").to_dict()}, user="t")
    now[0] += 0.99
    assert routes.get("support") != Split("bot@2")  # not yet: the log is read once per interval
    now[0] += 0.01
    assert routes.get("support") == Split("bot@2") and len(reads) == 2 and reads[1] > 0
    assert routes.get("support") == Split("bot@2") and len(reads) == 2


def test_a_split_of_another_base_models_versions_is_skipped(setup, caplog) -> None:
    """One registry may hold adapters of several base models: a split set on a server of one base
    names versions a server of another cannot load, so that server skips it (with a warning)."""
    from peftkit.serve.catalog import Catalog

    reg = Registry.open(setup["registry"], create=False)
    recorded = reg.resolve_version("bot@2").base_fingerprint
    assert recorded
    reg.record("route", "multi", None, {"after": Split("bot@1", "bot@2", 50).to_dict()}, user="t")
    same = Routes({})
    same.follow(reg, Catalog(["base"], {}, reg, base_fingerprint=recorded))
    assert same.splits["multi"] == Split("bot@1", "bot@2", 50)
    other = Routes({})
    other.follow(reg, Catalog(["base"], {}, reg, base_fingerprint="sha256:" + "0" * 64))
    assert "multi" not in other.splits and "trained on another base model" in caplog.text
