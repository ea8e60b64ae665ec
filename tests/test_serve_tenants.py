"""Tenants, routes, limits and the admin API of `peftkit serve`, end to end: the real server on 127.0.0.1
over the real engine and a tiny saved Llama, spoken to with plain HTTP (urllib) and the `openai` client.

Four tenants with hashed keys: `acme` (alpha, the registry's `bot`, the canary route `support` as its
default), `globex` (beta, the registry's `secret`, the alias route `chat`), `slow` (2 requests a
minute) and `batch` (4 sequences a minute). Another tenant's model is the very same 404 as a missing one, found without any lookup; the
canary split matches its percentage and is sticky per user; the admin API (its own key) loads, unloads
and switches splits, each switch an audit entry in the registry."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from test_serve_http import free_port, save_adapter

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.registry import Registry
from peftkit.serve.commands import ServeConfig, load_serve_config, prepare
from peftkit.serve.tenants import Access, RateLimitedError, hash_key, user_bucket
from peftkit.serve.types import ParamError

KEYS = {
    "acme": "sk-acme",
    "acme2": "sk-acme-2",
    "globex": "sk-globex",
    "slow": "sk-slow",
    "batch": "sk-batch",
    "batch2": "sk-batch-2",
}
ADMIN = "admin-secret"
CANARY = 25


def tenants_config() -> dict:
    h = {k: hash_key(v) for k, v in KEYS.items()}
    return {
        "admin_key": hash_key(ADMIN),
        "tenants": {
            "acme": {
                "keys": [h["acme"], {"hash": h["acme2"], "default": "alpha"}],
                "models": ["alpha", "bot", "support", "ghost"],
                "default": "support",
            },
            "globex": {"keys": [h["globex"]], "models": ["beta", "secret", "later", "chat"]},
            "slow": {"keys": [h["slow"]], "models": ["alpha"], "rate_limit": {"requests_per_minute": 2}},
            "batch": {
                "keys": [h["batch"], h["batch2"]],
                "models": ["alpha"],
                "rate_limit": {"requests_per_minute": 4},  # 4 sequences at once, then one every 15 s
            },
        },
        "routes": {
            "support": {"stable": "bot@1", "canary": "bot@2", "canary_percent": CANARY},
            "chat": "beta",
        },
        "default_aliases": ["default"],
    }


def start(prepared) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(prepared.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", uv, thread


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tenants")
    dirs = {n: save_adapter(tiny_model_dir, root / n, s) for n, s in [("alpha", 1), ("beta", 2)]}
    reg = Registry.open(root / "registry")
    for name, seed in [("bot", 3), ("bot", 4), ("secret", 5)]:
        reg.register(name, save_adapter(tiny_model_dir, root / f"{name}{seed}", seed), user="t")
    reg.promote("bot@1", "production", force=True, user="t")
    reg.promote("secret@1", "production", force=True, user="t")
    return {"base": tiny_model_dir, "dirs": dirs, "registry": root / "registry", "root": root}


@pytest.fixture(scope="module")
def server(setup: dict):
    from peftkit.serve.engine import EngineConfig

    adapters = [f"{n}={d}" for n, d in setup["dirs"].items()]
    config = ServeConfig(max_tokens=40, shutdown_deadline=2, **tenants_config())
    prepared = prepare(
        str(setup["base"]), adapters, str(setup["registry"]), config, EngineConfig(max_len=96, max_batch=8)
    )
    url, uv, thread = start(prepared)
    yield url, prepared
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def base_name(setup: dict) -> str:
    return setup["base"].name


def call(
    url: str, body: bytes | dict | None = None, key: str | None = None, method: str | None = None
) -> tuple[int, dict, bytes]:
    """(status, headers, raw body) of a plain HTTP request with `Authorization: Bearer key`."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat(url: str, key: str, model: str, user: str | None = None, **kw) -> tuple[int, dict, dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    if user is not None:
        body["user"] = user
    status, headers, raw = call(url + "/v1/chat/completions", {**body, **kw}, key)
    return status, headers, json.loads(raw)


def is_openai_error(raw: bytes, code: str) -> bool:
    error = json.loads(raw)["error"]
    return set(error) == {"message", "type", "param", "code"} and error["code"] == code


# -- keys -------------------------------------------------------------------------------------------
def test_a_missing_or_wrong_key_is_401_in_openai_shape(server) -> None:
    url = server[0]
    for key in (None, "sk-wrong", ADMIN, hash_key(KEYS["acme"]), ""):
        for path, body in [("/v1/models", None), ("/v1/completions", {"model": "alpha", "prompt": "x"})]:
            status, headers, raw = call(url + path, body, key)
            assert status == 401 and is_openai_error(raw, "invalid_api_key"), (key, raw)
            assert headers["www-authenticate"] == "Bearer"
            assert b"sk-wrong" not in raw and ADMIN.encode() not in raw
    status, _, raw = call(url + "/v1/models", None, None)
    assert b"didn't provide an API key" in raw
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert call(url + "/health")[0] == 200 and call(url + "/ready")[0] == 200  # probes need no key


def test_a_tenant_sees_only_its_own_models(server, base_name) -> None:
    def ids(key: str) -> list[str]:
        client = openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)
        return [m.id for m in client.models.list().data]

    assert ids(KEYS["acme"]) == [base_name, "alpha", "bot", "support"]  # "ghost" does not exist
    assert ids(KEYS["acme2"]) == ids(KEYS["acme"])
    globex = ids(KEYS["globex"])
    assert globex[0] == base_name and set(globex) - {"later"} == {base_name, "beta", "secret", "chat"}
    assert ids(KEYS["slow"]) == [base_name, "alpha"]


def test_a_404_lists_the_names_this_caller_may_use_and_no_other_tenants(server, base_name) -> None:
    # Not the `slow` key: its 2 requests a minute are test_a_key_over_its_rate_gets_429_with_retry_after's.
    for key, usable in [
        (KEYS["acme"], [base_name, "alpha", "bot", "support"]),
        (
            KEYS["globex"],
            [m["id"] for m in json.loads(call(server[0] + "/v1/models", None, KEYS["globex"])[2])["data"]],
        ),
    ]:
        status, _, raw = call(server[0] + "/v1/completions", {"model": "alpah", "prompt": "x"}, key)
        message = json.loads(raw)["error"]["message"]
        assert status == 404 and message == (
            f"The model `alpah` does not exist. Models you can use: {', '.join(f'`{n}`' for n in usable)}."
        )


def test_another_tenants_model_is_the_same_404_as_a_missing_one_without_a_lookup(
    server, setup, monkeypatch
) -> None:
    """Byte for byte: the body for another tenant's adapter, registry name, version or route equals the
    body for a name that exists nowhere (with the name swapped in); the registry is never asked."""
    url, prepared = server
    asked = []
    registry = prepared.catalog.registry
    real = registry.resolve_version
    monkeypatch.setattr(registry, "resolve_version", lambda ref: asked.append(str(ref)) or real(ref))

    def raw_404(model: str, path: str) -> tuple[bytes, dict]:
        body = {"model": model, "prompt": "x", "max_tokens": 1}
        if path == "/v1/chat/completions":
            body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        status, headers, raw = call(url + path, body, KEYS["acme"])
        assert status == 404 and is_openai_error(raw, "model_not_found")
        return raw, {k: v for k, v in headers.items() if k not in ("date", "content-length")}

    for path in ("/v1/completions", "/v1/chat/completions"):
        for name in ("secret", "secret@1", "secret@production", "beta", "chat", "later"):
            forbidden, h1 = raw_404(name, path)
            missing, h2 = raw_404("zz-nothing", path)
            assert forbidden == missing.replace(b"zz-nothing", name.encode()) and h1 == h2
    assert asked == []  # no lookup for a name the tenant may not use
    assert raw_404("bot@9", "/v1/completions")  # allowed but missing: it is looked up
    assert asked == ["bot@9"]
    assert raw_404("ghost", "/v1/completions")[0] == raw_404("zz-nothing", "/v1/completions")[0].replace(
        b"zz-nothing", b"ghost"
    )
    # The same name, before and after it exists (for globex): acme's answer does not change.
    before, _ = raw_404("later", "/v1/completions")
    reg = Registry.open(setup["registry"], create=False)
    reg.register("later", save_adapter(setup["base"], setup["root"] / "later", 9), user="t")
    reg.promote("later@1", "production", force=True, user="t")
    assert chat(url, KEYS["globex"], "later")[0] == 200
    assert raw_404("later", "/v1/completions")[0] == before


# -- routes -----------------------------------------------------------------------------------------
def test_the_base_name_and_default_aliases_serve_the_keys_default(server, base_name) -> None:
    url = server[0]
    status, headers, body = chat(url, KEYS["acme"], base_name, user="u-1")
    version = headers["x-peftkit-adapter"]
    assert status == 200 and version in ("bot@1", "bot@2") and body["model"] == version
    direct = chat(url, KEYS["acme"], version)[2]["choices"][0]["message"]["content"]
    assert body["choices"][0]["message"]["content"] == direct  # it really ran on that version
    assert chat(url, KEYS["acme"], "default", user="u-1")[1]["x-peftkit-adapter"] == version
    # A key's own default beats its tenant's; a tenant with none gets the base model.
    _, headers, body = chat(url, KEYS["acme2"], base_name)
    alpha = chat(url, KEYS["acme"], "alpha")[2]["choices"][0]["message"]["content"]
    assert headers["x-peftkit-adapter"] == "alpha" and body["choices"][0]["message"]["content"] == alpha
    for model in (base_name, "default"):
        _, headers, body = chat(url, KEYS["globex"], model)
        assert headers["x-peftkit-adapter"] == base_name == body["model"]
    _, headers, body = chat(url, KEYS["globex"], "chat")
    assert headers["x-peftkit-adapter"] == "beta" == body["model"]
    # Streaming says the version too, in the header and in every chunk.
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["acme"], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="support", messages=[{"role": "user", "content": "hi"}], max_tokens=3, user="u-1", stream=True
    )
    assert raw.headers["x-peftkit-adapter"] == version
    assert {c.model for c in raw.parse()} == {version}


def test_a_canary_split_matches_its_percentage_and_is_sticky_per_user(server) -> None:
    """400 distinct users at 25%: the canary count is the hash rule's exactly and within 4 sigma of
    the binomial mean; a user sees the same version every time."""
    url = server[0]
    users = [f"user-{i}" for i in range(400)]

    def version(user: str | None) -> str:
        status, headers, body = chat(url, KEYS["acme"], "support", user=user, max_tokens=1)
        assert status == 200 and headers["x-peftkit-adapter"] == body["model"]
        return body["model"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(version, users))
    canary = sum(v == "bot@2" for v in got)
    assert set(got) == {"bot@1", "bot@2"}
    mean, sigma = 400 * CANARY / 100, (400 * CANARY / 100 * (1 - CANARY / 100)) ** 0.5
    assert abs(canary - mean) <= 4 * sigma, canary
    assert got == ["bot@2" if user_bucket("support", u) < CANARY * 100 else "bot@1" for u in users]
    for user in users[:6]:
        assert {version(user) for _ in range(3)} == {got[users.index(user)]}
    assert {version(None) for _ in range(40)} == {"bot@1", "bot@2"}  # random without a user (p ~ 1e-5)


def test_switching_and_rolling_back_a_split_is_an_admin_call_with_an_audit_entry(server, setup) -> None:
    url = server[0]
    users = [f"switch-{i}" for i in range(12)]

    def versions() -> set[str]:
        return {chat(url, KEYS["acme"], "support", user=u, max_tokens=1)[2]["model"] for u in users}

    assert versions() == {"bot@1", "bot@2"}
    status, _, raw = call(
        url + "/admin/canary",
        {"route": "support", "canary_percent": 100, "user": "ops", "reason": "go"},
        ADMIN,
    )
    change = json.loads(raw)
    assert status == 200 and change["canary_percent"] == 100 and change["audit"]["action"] == "route"
    assert versions() == {"bot@2"}  # the next request on
    status, _, raw = call(url + "/admin/canary/rollback", {"route": "support", "reason": "errors"}, ADMIN)
    assert status == 200 and json.loads(raw)["canary_percent"] == 0
    assert versions() == {"bot@1"}
    routes = json.loads(call(url + "/admin/routes", None, ADMIN)[2])["routes"]
    assert routes["support"] == {"stable": "bot@1", "canary": "bot@2", "canary_percent": 0}
    call(url + "/admin/canary", {"route": "support", "canary_percent": CANARY}, ADMIN)  # as it was
    reg = Registry.open(setup["registry"], create=False)
    entries = [e for e in reg.history("support") if e.action == "route"][-3:]
    assert [(e.who, e.version, e.details["after"]["canary_percent"]) for e in entries] == [
        ("ops", 2, 100),
        ("admin", 2, 0),
        ("admin", 2, CANARY),
    ]
    assert (
        entries[0].details["before"]["canary_percent"] == CANARY and entries[1].details["reason"] == "errors"
    )
    assert reg.check() == []  # the audit chain holds


# -- the admin API ----------------------------------------------------------------------------------
def test_the_admin_api_needs_the_admin_key(server) -> None:
    url = server[0]
    for key in (None, "nope", KEYS["acme"], hash_key(ADMIN)):
        for path, body in [("/admin/adapters", None), ("/admin/adapters/load", {"model": "beta"})]:
            status, headers, raw = call(url + path, body, key)
            assert status == 401 and is_openai_error(raw, "invalid_admin_key"), (key, raw)
    assert call(url + "/admin/adapters", None, ADMIN)[0] == 200


def test_the_admin_api_is_403_without_an_admin_key_and_a_full_queue_is_429(setup) -> None:
    """A second server, with no keys, no admin key and a queue of one."""
    from peftkit.serve.engine import EngineConfig

    prepared = prepare(
        str(setup["base"]),
        [],
        str(setup["registry"]),
        ServeConfig(),
        EngineConfig(max_len=96, max_batch=1, max_queue=1),
    )
    url, uv, thread = start(prepared)
    try:
        for key in (None, ADMIN):
            status, _, raw = call(url + "/admin/adapters", None, key)
            assert status == 403 and is_openai_error(raw, "admin_disabled") and b"admin_key" in raw
        body = {"model": "bot", "prompt": "go", "max_tokens": 90, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: call(url + "/v1/completions", body, "any"), range(6)))
        full = [a for a in answers if a[0] == 429]
        assert full and all(a[0] == 200 for a in answers if a[0] != 429)
        assert all(is_openai_error(a[2], "queue_full") and int(a[1]["retry-after"]) >= 1 for a in full)
    finally:
        uv.should_exit = True
        thread.join(10)


def test_admin_hot_load_and_unload_show_in_the_admin_list(server, setup) -> None:
    url = server[0]

    def listed() -> dict[str, dict]:
        status, _, raw = call(url + "/admin/adapters", None, ADMIN)
        assert status == 200
        return {row["id"]: row for row in json.loads(raw)["data"]}

    rows = listed()
    assert {"alpha", "beta", "bot@1", "bot@2", "secret@1"} <= set(rows)
    assert rows["beta"]["loaded"] and rows["beta"]["source"] == "configured"  # --adapters load at start
    assert rows["bot@2"]["stage"] == "draft" and rows["secret@1"]["stage"] == "production"
    status, _, raw = call(url + "/admin/adapters/unload", {"model": "beta"}, ADMIN)
    assert status == 200 and json.loads(raw) == {"model": "beta", "key": "beta", "loaded": False}
    assert not listed()["beta"]["loaded"]
    status, _, raw = call(url + "/admin/adapters/unload", {"model": "beta"}, ADMIN)
    assert status == 404 and is_openai_error(raw, "adapter_not_loaded")
    for model in ("beta", "secret@production"):
        status, _, raw = call(url + "/admin/adapters/load", {"model": model}, ADMIN)
        assert status == 200 and json.loads(raw)["loaded"], raw
    rows = listed()
    assert rows["beta"]["loaded"] and isinstance(rows["beta"]["slot"], int)
    assert rows["secret@1"]["loaded"] and rows["secret@1"]["requests"] == 0
    assert chat(url, KEYS["globex"], "beta")[0] == 200
    # Never a path or a URL: only what the server was configured with.
    for model in (str(setup["dirs"]["alpha"]), "../alpha", "http://example.com/a", "nope@1"):
        status, _, raw = call(url + "/admin/adapters/load", {"model": model}, ADMIN)
        assert status == 404 and is_openai_error(raw, "model_not_found")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/canary", {"route": "support", "canary_percent": 150}, 400),
        ("/admin/canary", {"route": "support", "canary_percent": "half"}, 400),
        ("/admin/canary", {"route": "support", "canary": "bot@77"}, 400),
        ("/admin/canary", {"route": "support", "canary": None, "canary_percent": 5}, 400),
        ("/admin/canary", {"route": "support", "surprise": 1}, 400),
        ("/admin/canary", {"route": "nowhere", "canary_percent": 5}, 404),
        ("/admin/canary", {"route": "alpha", "stable": "bot@1"}, 400),
        ("/admin/canary", {"route": "../x", "stable": "bot@1"}, 400),
        ("/admin/canary/rollback", {"route": "nowhere"}, 404),
        ("/admin/canary", b"{broken", 400),
        ("/admin/adapters/load", {"model": 5}, 400),
        ("/admin/adapters/load", {"model": "huh"}, 404),
        ("/admin/adapters/unload", {}, 400),
    ],
)
def test_bad_admin_requests_are_4xx_and_change_nothing(server, path, body, status) -> None:
    url = server[0]
    before = call(url + "/admin/routes", None, ADMIN)[2]
    got, _, raw = call(url + path, body, ADMIN)
    assert got == status, raw
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert call(url + "/admin/routes", None, ADMIN)[2] == before


def test_metrics_need_the_admin_key_with_tenants_and_label_tenants_and_splits(server) -> None:
    """/metrics names every tenant and adapter, so with tenants it is the admin's alone."""
    url = server[0]
    for path in ("/metrics", "/metrics.json"):
        for key in (None, KEYS["acme"]):
            status, _, raw = call(url + path, None, key)
            assert status == 401 and is_openai_error(raw, "invalid_admin_key")
    # Each tenant asks here: under xdist the module's other tests may run on another worker's server.
    assert chat(url, KEYS["globex"], "beta")[0] == 200 and chat(url, KEYS["acme"], "alpha")[0] == 200
    status, _, raw = call(url + "/metrics", None, ADMIN)
    assert status == 200 and b'tenant="globex"' in raw and b'tenant="acme"' in raw
    splits = json.loads(call(url + "/metrics.json", None, ADMIN)[2])["splits"]
    assert {"route": "support", "stable": "bot@1", "canary": "bot@2", "canary_percent": CANARY} in splits


# -- limits -----------------------------------------------------------------------------------------
def test_a_key_over_its_rate_gets_429_with_retry_after(server) -> None:
    url = server[0]
    body = {"model": "alpha", "prompt": "x", "max_tokens": 1}
    assert [call(url + "/v1/completions", body, KEYS["slow"])[0] for _ in range(2)] == [200, 200]
    status, headers, raw = call(url + "/v1/completions", body, KEYS["slow"])
    assert status == 429 and is_openai_error(raw, "rate_limit_exceeded")
    assert headers["retry-after"].isdigit() and 1 <= int(headers["retry-after"]) <= 30
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["slow"], max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="alpha", prompt="x", max_tokens=1)
    assert call(url + "/v1/completions", body, KEYS["acme"])[0] == 200  # other keys are not slowed
    assert call(url + "/v1/models", None, KEYS["slow"])[0] == 200  # only generation counts


def test_a_request_costs_one_token_per_sequence_and_a_refused_one_costs_nothing() -> None:
    rate_limit = {"requests_per_minute": 4}  # burst 4; one token back every 15 s
    access = Access.from_config(None, {"t": {"keys": [hash_key("k")], "rate_limit": rate_limit}}, None)
    who = access.authenticate("Bearer k")
    access.admit(who, cost=4, now=100.0)  # n=4: the whole burst
    with pytest.raises(RateLimitedError) as e:
        access.admit(who, cost=1, now=100.0)
    assert e.value.retry_after == 15
    with pytest.raises(RateLimitedError) as e:
        access.admit(who, cost=2, now=110.0)  # 2/3 of a token back: 2 need 20 s more
    assert e.value.retry_after == 20
    access.admit(who, cost=2, now=131.0)  # the refused request took nothing
    with pytest.raises(ParamError, match="asks for 5 sequences.*at most 4 at once") as e:
        access.admit(who, cost=5, now=1000.0)  # could never pass: a 400 on n, not a 429 to retry
    assert e.value.param == "n"
    access.admit(who, cost=4, now=1000.0)


def test_choices_count_against_the_rate_limit_one_per_sequence(server) -> None:
    url = server[0]
    prompt = {"model": "alpha", "prompt": "x", "max_tokens": 1}
    chat_body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for key, first, then in [
        (KEYS["batch"], ("/v1/chat/completions", chat_body), ("/v1/completions", prompt)),
        (KEYS["batch2"], ("/v1/completions", prompt), ("/v1/chat/completions", chat_body)),
    ]:  # each key is its own bucket of 4
        # refused by the request checks (stream_options without stream) before the bucket: costs nothing
        bad = {**first[1], "n": 3, "stream_options": {"include_usage": True}}
        status, _, raw = call(url + first[0], bad, key)
        assert status == 400 and json.loads(raw)["error"]["param"] == "stream_options", raw
        status, _, raw = call(url + first[0], {**first[1], "n": 4}, key)
        assert status == 200 and len(json.loads(raw)["choices"]) == 4, raw
        status, headers, raw = call(url + then[0], {**then[1], "n": 1}, key)
        assert status == 429 and is_openai_error(raw, "rate_limit_exceeded"), raw
        assert 10 <= int(headers["retry-after"]) <= 15  # the next sequence's token is ~15 s away
    status, _, raw = call(url + "/v1/completions", {**prompt, "n": 5}, KEYS["batch"])
    assert status == 400 and json.loads(raw)["error"]["param"] == "n"


@pytest.mark.parametrize(
    "body",
    [
        {"model": 3, "prompt": "x"},
        {"model": "alpha", "prompt": "x", "max_tokens": 41},
        {"model": "alpha", "prompt": "x" * 200},
        {"model": "alpha", "prompt": "x", "user": {"id": 1}},
        b"\xff\xfe",
    ],
)
def test_malformed_requests_from_a_tenant_are_4xx(server, body) -> None:
    status, _, raw = call(server[0] + "/v1/completions", body, KEYS["acme"])
    assert 400 <= status < 500 and "error" in json.loads(raw)


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tenants": {"a": {"keys": ["sk-plain"], "models": []}}}, "tenants.a.keys[0] must be a key's hash"),
        ({"tenants": {"a": {"keys": [], "models": []}}}, "tenants.a.keys must list"),
        ({"tenants": {"a": {"keys": [hash_key("k")], "modles": []}}}, "unknown key tenants.a.modles"),
        ({"tenants": {"a": {"keys": [hash_key("k")]}, "b": {"keys": [hash_key("k")]}}}, "same key"),
        ({"admin_key": "k", "tenants": {"a": {"keys": [hash_key("k")]}}}, "admin key must be its own"),
        ({"routes": {"r": {"stable": "x", "canary_percent": 5}}}, "no canary version"),
        ({"routes": {"r": {"stable": "x", "canary": "y", "canary_percent": 101}}}, "from 0 to 100"),
        ({"routes": {"r/x": "y"}}, "routes.r/x"),
        ({"rate_limit": {"requests_per_minute": 0}}, "requests_per_minute must be a number above 0"),
        ({"tenants": {"a": {"keys": [hash_key("k")], "rate_limit": {"rpm": 5}}}}, "tenants.a.rate_limit.rpm"),
    ],
)
def test_bad_tenant_and_route_config_is_named(tmp_path, change, message) -> None:
    import yaml

    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_serve_config(tmp_path / "serve.yaml")


def test_a_route_to_nothing_stops_the_command_before_the_model_loads(setup, tmp_path, capsys) -> None:
    (tmp_path / "serve.yaml").write_text("routes:\n  support:\n    stable: bot@1\n    canary: bot@99\n")
    argv = ["serve", "--base", str(tmp_path / "no-model"), "--registry", str(setup["registry"])]
    assert main([*argv, "--config", str(tmp_path / "serve.yaml")]) == 2
    err = capsys.readouterr().err
    assert "routes.support.canary: 'bot@99' names no served model" in err and "no-model" not in err


def test_hash_key_prints_the_hash_of_the_key_on_stdin(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-acme\n"))
    assert main(["serve", "--hash-key"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == "sha256:" + hashlib.sha256(b"sk-acme").hexdigest() == hash_key(KEYS["acme"])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["serve", "--hash-key"]) == 2


def test_the_documented_tenants_config_loads_and_its_hashes_are_its_keys(tmp_path) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "serve.md").read_text(encoding="utf-8")
    block = doc.split("```yaml\n# serve.yaml with tenants\n", 1)[1].split("```", 1)[0]
    (tmp_path / "serve.yaml").write_text(block)
    config, _ = load_serve_config(tmp_path / "serve.yaml")
    access, routes = config.access_and_routes()
    assert [t.name for t in access.tenants] == ["acme", "globex"] and access.admin is not None
    assert routes.splits["support-bot"].canary_percent == 10
    for key in ("sk-acme-1", "sk-globex-1"):  # the keys the docs' curl examples use
        assert hash_key(key) in block


def test_a_registry_outage_is_a_retryable_503_that_names_no_path(server, setup) -> None:
    """A registry the server cannot read is the server's problem, not the request's: 503 with
    Retry-After (clients retry), and nothing of the database's location in a tenant's answer."""
    url = server[0]
    db = setup["registry"] / "registry.db"
    saved = db.read_bytes()
    try:
        db.write_bytes(b"this is not a database " * 64)
        status, headers, raw = call(url + "/v1/models", None, KEYS["acme"])
        assert status == 503 and is_openai_error(raw, "registry_unavailable"), raw
        assert headers["retry-after"] == "1" and str(setup["root"]).encode() not in raw
    finally:
        db.write_bytes(saved)
    assert call(url + "/v1/models", None, KEYS["acme"])[0] == 200
