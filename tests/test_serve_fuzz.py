"""A fuzz run of `peftkit serve`'s HTTP API from its own OpenAPI schema: schemathesis reads
/openapi.json from the real server on 127.0.0.1 and sends every operation a fixed number of generated
requests (valid and invalid, from a fixed seed) plus its boundary-value cases; no response may be a 5xx,
and each must be as the schema documents it (its status code, content type, required headers, body).
The server runs with everything on that a request can reach: a configured adapter, registry versions, a
canary route and an alias, a tenant's key, the admin API. Half the requests name a model the server
serves (a random string never does), so sampling parameters reach the engine, and the key sent is the
right one, another one or none. Then each request the fuzzing (and probing around what it found) got a
5xx for, or that stopped the engine, is kept as a case of its own."""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import schemathesis
import torch
from test_serve_http import operations, served_app

from peftkit import AdaptedModel, LoraConfig
from peftkit.base import load_base
from peftkit.registry import Registry
from peftkit.serve.commands import ServeConfig, prepare
from peftkit.serve.tenants import hash_key

MAX_EXAMPLES = 25  # per operation, in the fuzzing phase (the coverage phase adds its boundary cases)
ADMIN, TENANT = "sk-admin-fuzz", "sk-acme-fuzz"
MODELS = ["alpha", "bot", "bot@2", "helpdesk", "default"]  # served names; the base is added below


def save_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    model, _ = load_base(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    return AdaptedModel.attach(model, LoraConfig(r=2, init_lora_weights=False)).save_adapter(out)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An adapter `alpha`, registry versions bot@1 (production) and bot@2, and the server's config: a
    canary route `bot` and an alias `helpdesk`, one tenant, the admin API, limits small enough that
    each generation is a few tokens."""
    root = tmp_path_factory.mktemp("fuzz")
    reg = Registry.open(root / "registry")
    for seed in (2, 3):
        reg.register("bot", save_adapter(tiny_model_dir, root / f"bot{seed}", seed), user="t")
    reg.promote("bot@1", "production", force=True, user="t")
    config = ServeConfig(
        max_tokens=8,
        max_n=3,
        max_prompts=2,
        max_prompt_tokens=40,
        shutdown_deadline=2,
        admin_key=ADMIN,
        tenants={"acme": {"keys": [hash_key(TENANT)], "models": ["alpha", "bot", "helpdesk"]}},
        routes={"bot": {"stable": "bot@1", "canary": "bot@2", "canary_percent": 50}, "helpdesk": "alpha"},
        default_aliases=("default",),
    )
    alpha = save_adapter(tiny_model_dir, root / "alpha", 1)
    return {
        "base": tiny_model_dir,
        "adapters": [f"alpha={alpha}"],
        "registry": root / "registry",
        "config": config,
    }


@contextmanager
def serving(setup: dict):
    """The real server (uvicorn on a free port, in a thread): (its URL, the prepared server)."""
    from peftkit.serve.engine import EngineConfig

    engine = EngineConfig(max_len=64, max_batch=4, chunk=16, adapter_slots=2, max_rank=2, max_queue=64)
    prepared = prepare(str(setup["base"]), setup["adapters"], str(setup["registry"]), setup["config"], engine)
    with served_app(prepared.app, log_level="critical") as url:
        yield url, prepared


@pytest.fixture(scope="module")
def server(setup: dict):
    with serving(setup) as running:
        yield running


# What each response is checked for: not a 5xx, and as /openapi.json documents it (its status, its
# content type, the headers it must have, the body's schema: an error's is the OpenAI error shape).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def fuzz_config() -> schemathesis.Config:
    """A deterministic run: a fixed seed, derandomized generation, valid and invalid cases, no shrinking
    (a failure is reported as found), only the checks this test is about."""
    return schemathesis.Config.from_dict(
        {
            "seed": 0,
            "suppress-health-check": ["all"],
            "request-timeout": 30,
            "workers": 1,
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "no-shrink": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
            "operations": [  # the two that reach the engine get more
                {
                    "include-path-regex": "^/v1/.*completions$",
                    "generation": {"max-examples": 4 * MAX_EXAMPLES},
                }
            ],
        }
    )


def request_mixer(base: str):
    """A schemathesis `before_call` hook. Before each request of every phase, chosen by a hash of the
    request and its number (the run is deterministic, so the n-th request is too): the right key (6 in
    8), the other key or none; and in half the bodies that name a model, a model the server serves
    (a generated string never is), with a non-empty prompt, so the fuzzed sampling parameters reach
    the engine."""
    calls = itertools.count()
    models = [*MODELS, base]

    def before_call(context, case, kwargs) -> None:  # noqa: ANN001 (schemathesis' hook signature)
        pick = zlib.crc32(repr((case.method, case.path, case.body, next(calls))).encode())
        admin = case.path.startswith("/admin")
        key = [*[ADMIN if admin else TENANT] * 6, TENANT if admin else ADMIN, None][pick % 8]
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.headers = {**headers, **({"Authorization": f"Bearer {key}"} if key else {})}
        body = case.body
        if not (isinstance(body, dict) and isinstance(body.get("model"), str) and pick // 8 % 2):
            return
        body = {**body, "model": models[pick // 16 % len(models)]}
        if body.get("prompt") in ("", []):
            body["prompt"] = "hi"
        if body.get("messages") == []:
            body["messages"] = [{"role": "user", "content": "hi"}]
        case.body = body

    return before_call


def fuzz(url: str, base: str, config: schemathesis.Config) -> tuple[list, Counter]:
    """Run schemathesis over the server's schema: (problems, Counter of (operation, status))."""
    from schemathesis.engine import events, from_schema
    from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

    api = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    problems: list = []
    statuses: Counter = Counter()
    before_call = schemathesis.hook(request_mixer(base))  # only global hooks see every request
    try:
        for event in from_schema(api).execute():
            if isinstance(event, (events.NonFatalError, events.FatalError)):
                problems.append(event)
            if not isinstance(event, events.ScenarioFinished):
                continue
            for interaction in event.recorder.interactions.values():
                request, response = interaction.request, interaction.response
                status = response.status_code if response is not None else None
                statuses[event.recorder.label, status] += 1
                if status is None or status >= 500:
                    body = response.content[:300] if response is not None else None
                    problems.append((request.method, request.uri, request.body, status, body))
            for checks in event.recorder.checks.values():
                problems += [c.failure_info for c in checks if c.failure_info is not None]
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)
    return problems, statuses


def test_no_request_gets_a_server_error_or_an_undocumented_answer(server) -> None:
    """schemathesis' own run over every operation of /openapi.json (its examples, boundary-value
    coverage and fuzzing phases): every request is answered, no answer is a 5xx or other than the
    schema documents (a status it does not list, a missing Retry-After, an error body not in the
    OpenAI shape), and the engine is still running afterwards (a request that kills it would
    otherwise show only as later errors)."""
    url, prepared = server
    problems, statuses = fuzz(url, prepared.catalog.base_names[0], fuzz_config())
    assert not problems, problems[:5]
    assert prepared.engine.error is None and prepared.engine.running, prepared.engine.error
    operations = {op for op, _ in statuses}
    assert len(operations) >= 11  # every operation was called
    for op in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert statuses[op, 200] >= 10, (op, statuses)  # and fuzzed parameters reached the engine


def test_with_tenants_and_an_admin_key_the_schema_requires_the_keys(server) -> None:
    """This server has tenants and an admin key: a key is required on /v1 (401 without one) and the
    admin key on /admin (401, never the 403 of a server without one)."""
    url, _ = server
    with urllib.request.urlopen(url + "/openapi.json", timeout=30) as r:
        schema = json.load(r)
    ops = operations(schema)
    for name in ("GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions"):
        assert ops[name]["security"] == [{"apiKey": []}], name
        assert ops[name]["responses"]["401"]["headers"]["WWW-Authenticate"]["required"], name
    admin = [op for name, op in ops.items() if " /admin/" in name]
    assert admin and all(op["security"] == [{"adminKey": []}] for op in admin)
    assert all("401" in op["responses"] and "403" not in op["responses"] for op in admin)


# Requests the fuzzing and probing around it found to get a 5xx or to stop the engine (which then
# fails every later request): each on a server of its own, followed by an ordinary request.
FOUND = [
    pytest.param(
        "/v1/completions", {"model": "bot@9223372036854775808", "prompt": "a"}, 404, id="version-2**63"
    ),
    pytest.param("/v1/completions", {"model": "alpha", "prompt": "\ud800"}, 400, id="lone-surrogate-prompt"),
    pytest.param(
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "a\udc00"}]},
        400,
        id="lone-surrogate-message",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "alpha", "prompt": "a", "temperature": 1e-300},
        200,
        id="tiny-temperature",
    ),
    pytest.param("/v1/completions", {"model": "alpha", "prompt": "a", "top_p": 1e-46}, 200, id="tiny-top-p"),
]


@pytest.mark.parametrize(("path", "body", "status"), FOUND)
def test_requests_found_by_fuzzing_are_answered_and_the_server_keeps_serving(
    setup, path, body, status
) -> None:
    with serving(setup) as (url, prepared):
        got, answer = post(url + path, body, TENANT)
        assert got == status, answer
        after, answer = post(url + "/v1/completions", {"model": "alpha", "prompt": "a"}, TENANT)
        assert after == 200 and prepared.engine.error is None, answer


def post(url: str, body: dict, key: str) -> tuple[int, str]:
    """(status, text) of a JSON POST (json.dumps writes a lone surrogate as its \\u escape)."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
