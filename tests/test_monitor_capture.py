"""Traffic capture and feedback (`peftkit serve --capture`, POST /v1/feedback) on the real server over a
tiny saved Llama, with a real registry: what is captured is exactly the responses chosen (every one at
rate 1, none when capture is off or a tenant opts out), redaction rules remove what they name before
anything is stored, text can be kept as hashes only, and feedback is filed under the adapter that
answered, never across tenants. The storage itself (rotation by rows and bytes) runs on SQLite and on a
real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from test_serve_http import save_adapter, served_app
from test_serve_metrics import scrape, value

from peftkit.registry import Registry
from peftkit.registry.traffic import (
    Feedback,
    Sample,
    add_samples,
    count_samples,
    feedback_of,
    latest_samples,
    put_feedback,
    text_sha256,
)
from peftkit.serve.commands import ServeConfig, prepare
from peftkit.serve.tenants import hash_key

KEYS = {"acme": "sk-acme-capture", "globex": "sk-globex-capture"}
PHONE = r"\d{3}-\d{4}"


def post(url: str, body: bytes | dict, key: str | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(predicate, timeout: float = 120.0):
    """Poll `predicate` until it returns something truthy (the writer stores every FLUSH_SECONDS)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("capture")
    return {
        "alpha": save_adapter(tiny_model_dir, root / "alpha", 1),
        "beta": save_adapter(tiny_model_dir, root / "beta", 2),
    }


def start(base: Path, adapters: dict, registry: Path, **config):
    from peftkit.serve.engine import EngineConfig

    prepared = prepare(
        str(base),
        [f"{n}={d}" for n, d in adapters.items()],
        str(registry),
        ServeConfig(max_tokens=24, shutdown_deadline=2, **config),
        EngineConfig(max_len=96, max_batch=4),
    )
    return prepared, served_app(prepared.app)


@pytest.fixture(scope="module")
def tenants_server(tiny_model_dir: Path, adapters: dict, tmp_path_factory: pytest.TempPathFactory):
    """Everything captured, with a redaction rule, but tenant globex opted out."""
    registry = tmp_path_factory.mktemp("capture-reg") / "registry"
    Registry.open(registry)
    tenants = {
        "acme": {"keys": [hash_key(KEYS["acme"])], "models": ["alpha"]},
        "globex": {"keys": [hash_key(KEYS["globex"])], "models": ["beta"]},
    }
    prepared, served = start(
        tiny_model_dir, adapters, registry, tenants=tenants, capture=1.0, capture_redact=[PHONE],
        capture_tenants={"globex": 0},
    )  # fmt: skip
    with served as url:
        yield url, Registry.open(registry), prepared


def client(url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[tenant], max_retries=0)


def test_a_captured_completion_is_stored_redacted_with_its_facts(tenants_server) -> None:
    url, reg, prepared = tenants_server
    r = client(url, "acme").completions.create(
        model="alpha", prompt="call 555-1234 now", max_tokens=6, temperature=0
    )
    rows = wait_for(lambda: [s for _, s in latest_samples(reg.db, "alpha", 50) if s.response_id == r.id])
    assert len(rows) == 1
    s = rows[0]
    assert s.prompt == "call [REDACTED] now" and "555" not in s.prompt  # redacted before it was written
    assert s.output == prepared.app.state.observer.policy.scrub(r.choices[0].text)
    assert (s.name, s.version, s.model, s.tenant, s.kind) == ("alpha", "", "alpha", "acme", "completion")
    assert (s.prompt_tokens, s.output_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert s.finish_reason == r.choices[0].finish_reason
    assert s.prompt_sha256 == text_sha256(s.prompt) and s.prompt_chars == len(s.prompt)
    assert 0 < s.ttft <= s.latency < 60 and abs(s.at - time.time()) < 60


def test_a_streamed_chat_is_captured_with_its_template(tenants_server) -> None:
    url, reg, _ = tenants_server
    stream = client(url, "acme").chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hello there"}], max_tokens=5, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rows = wait_for(
        lambda: [s for _, s in latest_samples(reg.db, "alpha", 50) if s.response_id == chunks[0].id]
    )
    assert len(rows) == 1 and rows[0].kind == "chat" and rows[0].output == text
    assert "hello there" in rows[0].prompt and rows[0].prompt != "hello there"  # as the model saw it


def test_an_opted_out_tenant_is_never_captured_but_gets_feedback(tenants_server) -> None:
    url, reg, _ = tenants_server
    r = client(url, "globex").completions.create(model="beta", prompt="private", max_tokens=3)
    time.sleep(1.5)  # three writer intervals
    assert "beta" not in count_samples(reg.db)
    status, body = post(
        url + "/v1/feedback", {"id": r.id, "label": "down", "comment": "555-0000"}, KEYS["globex"]
    )
    assert status == 200 and json.loads(body)["stored"] is True
    (fb,) = [f for f in feedback_of(reg.db, "beta") if f.response_id == r.id]
    assert (fb.tenant, fb.label, fb.score, fb.comment) == ("globex", "down", -1.0, "[REDACTED]")


def test_feedback_never_crosses_tenants_and_unknown_ids_look_the_same(tenants_server) -> None:
    url, reg, _ = tenants_server
    theirs = client(url, "globex").completions.create(model="beta", prompt="x", max_tokens=2)
    other = post(url + "/v1/feedback", {"id": theirs.id, "label": "up"}, KEYS["acme"])
    unknown = post(url + "/v1/feedback", {"id": "cmpl-never-issued", "label": "up"}, KEYS["acme"])
    assert other == unknown and other[0] == 404
    assert json.loads(other[1])["error"]["code"] == "response_not_found"
    assert not [f for f in feedback_of(reg.db) if f.response_id == theirs.id]
    assert post(url + "/v1/feedback", {"id": theirs.id, "label": "up"})[0] == 401  # no key


def test_feedback_is_counted_replaced_and_bad_bodies_are_4xx(tenants_server) -> None:
    url, reg, _ = tenants_server
    r = client(url, "acme").completions.create(model="alpha", prompt="rate me", max_tokens=2)
    feedback = url + "/v1/feedback"
    first = json.loads(post(feedback, {"id": r.id, "score": 0.5}, KEYS["acme"])[1])
    second = json.loads(post(feedback, {"id": r.id, "label": "down"}, KEYS["acme"])[1])
    assert (first["label"], first["replaced"], second["label"], second["replaced"]) == (
        "up",
        False,
        "down",
        True,
    )
    assert [(f.score, f.label) for f in feedback_of(reg.db, "alpha") if f.response_id == r.id] == [
        (-1.0, "down")
    ]
    for bad in (
        {"id": r.id, "score": 1.5},
        {"id": r.id, "score": 0.1, "label": "up"},
        {"id": r.id},
        {"id": r.id, "label": "meh"},
        {"id": "", "label": "up"},
        {"id": r.id, "label": "up", "extra": 1},
        b"{not json",
        b"[]",
    ):
        status, body = post(feedback, bad, KEYS["acme"])
        assert status == 400, (bad, body)
        assert json.loads(body)["error"]["message"]


def test_capture_off_stores_nothing_and_feedback_still_counts(tiny_model_dir, adapters, tmp_path) -> None:
    registry = tmp_path / "registry"
    Registry.open(registry)
    prepared, served = start(tiny_model_dir, adapters, registry)  # the defaults: capture 0
    with served as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        ids = [
            c.completions.create(model=m, prompt="hi", max_tokens=3).id for m in ("alpha", "beta", "alpha")
        ]
        assert post(url + "/v1/feedback", {"id": ids[1], "label": "up"})[0] == 200
        assert post(url + "/v1/feedback", {"id": ids[2], "score": -0.25})[0] == 200
        time.sleep(1.0)
        metrics = scrape(url)
    assert prepared.app.state.observer.writer is None  # no writer thread at all
    assert count_samples(Registry.open(registry).db) == {}
    assert value(metrics, "peftkit_feedback_total", adapter="beta", version="", label="up") == 1
    assert value(metrics, "peftkit_feedback_total", adapter="alpha", label="down") == 1
    assert value(metrics, "peftkit_capture_samples_total") == 0


def test_text_off_keeps_only_hashes_and_lengths(tiny_model_dir, adapters, tmp_path) -> None:
    registry = tmp_path / "registry"
    Registry.open(registry)
    _, served = start(tiny_model_dir, adapters, registry, capture_adapters={"beta": 1.0}, capture_text=False)
    with served as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        a = c.completions.create(model="alpha", prompt="not sampled", max_tokens=3)
        b = c.completions.create(model="beta", prompt="sampled", max_tokens=4, temperature=0)
        reg = Registry.open(registry)
        rows = wait_for(lambda: latest_samples(reg.db, "beta", 10))
        metrics = scrape(url)
    assert [s.response_id for _, s in rows] == [b.id] and a.id
    s = rows[0][1]
    assert (s.prompt, s.output) == (None, None)
    assert (s.prompt_sha256, s.prompt_chars) == (text_sha256("sampled"), len("sampled"))
    assert (s.output_sha256, s.output_chars) == (text_sha256(b.choices[0].text), len(b.choices[0].text))
    assert count_samples(reg.db) == {"beta": 1}
    assert value(metrics, "peftkit_capture_samples_total", adapter="beta") == 1


def test_bad_capture_settings_are_refused_before_anything_loads() -> None:
    from peftkit.errors import ConfigError

    for bad, named in (
        ({"capture": 1.5}, "capture"),
        ({"capture": "lots"}, "capture"),
        ({"capture_redact": ["(unclosed"]}, "capture_redact[0]"),
        ({"capture_tenants": {"acme": 2}}, "capture_tenants.acme"),
        ({"capture_max_rows": 0}, "capture_max_rows"),
    ):
        with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
            ServeConfig(**bad)


# -- storage ----------------------------------------------------------------------------------------------
def sample(name: str, i: int, text: str = "p") -> Sample:
    return Sample.of(
        text, "o", keep_text=True, response_id=f"r{i}", choice=0, at=1000.0 + i, name=name, version="1",
        model=name, tenant="", kind="completion", prompt_tokens=1, output_tokens=1, finish_reason="stop",
        latency=0.1, ttft=0.05,
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "reg")
    return request.getfixturevalue("postgres_url") + f"&files={tmp_path / 'reg'}"


def test_rotation_keeps_each_names_newest_rows_within_both_budgets(location) -> None:
    db = Registry.open(location).db
    add_samples(db, [sample("a", i) for i in range(5)] + [sample("b", 9)], max_rows=3, max_bytes=10**9)
    assert [s.response_id for _, s in latest_samples(db, "a", 10)] == ["r2", "r3", "r4"]
    assert count_samples(db) == {"a": 3, "b": 1}  # another name's rows are not its budget
    big = sample("a", 10, "x" * 1000)
    add_samples(db, [big], max_rows=3, max_bytes=big.bytes + sample("a", 0).bytes)
    assert [s.response_id for _, s in latest_samples(db, "a", 10)] == ["r4", "r10"]
    newest = latest_samples(db, "a", 1)
    assert [s.response_id for _, s in latest_samples(db, "a", 5, before_id=newest[0][0])] == ["r4"]


def test_feedback_is_one_row_per_response(location) -> None:
    db = Registry.open(location).db
    fb = Feedback("r1", 5.0, "a", "1", "a", "t", 1.0, "up")
    assert put_feedback(db, fb) is None
    assert put_feedback(db, Feedback("r1", 6.0, "a", "1", "a", "t", -0.5, "down", "no")) == fb
    assert [(f.score, f.label, f.comment) for f in feedback_of(db, "a")] == [(-0.5, "down", "no")]
    assert feedback_of(db, "a", since=7.0) == []


# -- a killed server ----------------------------------------------------------------------------------------
def test_a_killed_server_keeps_every_committed_sample(tiny_model_dir, adapters, tmp_path) -> None:
    """SIGKILL: no shutdown runs, yet each sample stored before it stays, and the registry is sound."""
    from test_serve_http import free_port

    registry = tmp_path / "registry"
    port = free_port()
    cmd = [sys.executable, "-m", "peftkit", "serve", "--base", str(tiny_model_dir), "--adapters",
           f"alpha={adapters['alpha']}", "--registry", str(registry), "--port", str(port), "--capture", "1",
           "--engine.max_len", "96"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        for line in proc.stdout:
            if "listening on" in line:
                break
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        ids = [c.completions.create(model="alpha", prompt=f"p{i}", max_tokens=2).id for i in range(4)]
        reg = Registry.open(registry)
        stored = wait_for(lambda: len(latest_samples(reg.db, "alpha", 10)) == 4)
        assert stored
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        proc.kill()
    reg = Registry.open(registry)
    assert sorted(s.response_id for _, s in latest_samples(reg.db, "alpha", 10)) == sorted(ids)
    assert reg.check() == []
