"""`peftkit serve` end to end: the real server on 127.0.0.1 over the real engine and a tiny saved Llama,
spoken to with the real `openai` client and plain HTTP. Greedy answers through the server equal offline
generation with the same adapter (base, --adapters, registry versions); streaming, stop strings, n,
seeds, logprobs and usage behave as in the OpenAI API; every refused request is a 4xx with the OpenAI
error shape; a promotion is served without a restart; the CLI checks its inputs before loading."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch

from peftkit import AdaptedModel, LoraConfig
from peftkit.base import load_base
from peftkit.cli import main
from peftkit.eval.generation import generate_answers
from peftkit.registry import Registry
from peftkit.serve.commands import ServeConfig, prepare

MAX_LEN = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(app, log_level: str = "warning") -> Iterator[str]:
    """`app` under a real uvicorn on 127.0.0.1 (a free port, in a thread): its base URL."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)


def save_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    model, _ = load_base(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    AdaptedModel.attach(model, LoraConfig(r=2, lora_alpha=8, init_lora_weights=False)).save_adapter(out)
    return out


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two adapter directories and a registry: `reg` (v1 production, v2 staging), `rollout` (v1
    production, v2 draft: promoted by a test), `alien` (trained on another base)."""
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("serve")
    dirs = {
        name: save_adapter(tiny_model_dir, root / name, seed) for name, seed in [("alpha", 1), ("beta", 2)]
    }
    reg = Registry.open(root / "registry")
    for name, seeds in [("reg", (3, 4)), ("rollout", (5, 6))]:
        for seed in seeds:
            reg.register(name, save_adapter(tiny_model_dir, root / f"{name}{seed}", seed), user="t")
        reg.promote(f"{name}@1", "production", force=True, user="t")
    reg.promote("reg@2", "staging", user="t")
    torch.manual_seed(7)
    AdaptedModel.attach(tiny_llama(), LoraConfig(r=2)).save_adapter(root / "alien")
    reg.register("alien", root / "alien", user="t")
    reg.promote("alien@1", "production", force=True, user="t")
    return {"base": tiny_model_dir, "dirs": dirs, "registry": root / "registry"}


@pytest.fixture(scope="module")
def server(setup: dict):
    """The real server (uvicorn on a free port, in a thread), like `peftkit serve` builds it."""
    from peftkit.serve.engine import EngineConfig

    adapters = [f"{n}={d}" for n, d in setup["dirs"].items()]
    config = ServeConfig(max_tokens=40, max_n=4, max_prompt_tokens=60, shutdown_deadline=2)
    prepared = prepare(
        str(setup["base"]),
        adapters,
        str(setup["registry"]),
        config,
        EngineConfig(max_len=MAX_LEN, max_batch=8),
    )
    with served_app(prepared.app) as url:
        yield url, prepared
    assert not prepared.engine.running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="anything", max_retries=0)


@pytest.fixture(scope="module")
def base_name(setup: dict) -> str:
    return setup["base"].name


def http(url: str, body: bytes | dict | None = None, method: str | None = None) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of a plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def offline(setup: dict, prompts: list[str], models: list[str | None], max_new_tokens: int) -> list[str]:
    """Greedy answers from `peftkit generate`'s path (generate_answers), fp32, each adapter loaded from
    its own files: a directory, or the registry version's files."""
    from peftkit.data.example import Message

    model, tok = load_base(str(setup["base"]), dtype=torch.float32)
    am = AdaptedModel(model)
    reg = Registry.open(setup["registry"], create=False)
    names = []
    for m in models:
        if m is None:
            names.append(None)
            continue
        name = m.replace("@", "_v")
        if name not in am.adapters:
            path = setup["dirs"][m] if m in setup["dirs"] else reg.resolve(m)
            am.load_adapter(path, name)
        names.append(name)
    chats = [[Message("user", p)] for p in prompts]
    return generate_answers(am, tok, chats, max_new_tokens=max_new_tokens, adapter_names=names)


# -- the API ----------------------------------------------------------------------------------------
def test_models_lists_the_base_the_adapters_and_registry_names_in_production(client, base_name) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [base_name, "alpha", "beta", "alien", "reg", "rollout"]


def test_greedy_chat_through_the_server_equals_offline_generation(client, setup, base_name) -> None:
    """The key check: for the base, both --adapters and registry versions (by stage and by number),
    asked concurrently so they share engine steps, the server's greedy text is offline generation's."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(base_name, None), ("alpha", "alpha"), ("beta", "beta"), ("reg", "reg@1"), ("reg@2", "reg@2")]
    prompts = ["hello there", "What is 2+2?", "abc", "tell me more", "x"]
    asks = [(p, m) for p in prompts[:2] for m, _ in cases] + [(prompts[i], cases[i][0]) for i in range(2, 5)]

    def ask(pm: tuple[str, str]) -> str:
        r = client.chat.completions.create(
            model=pm[1], messages=[{"role": "user", "content": pm[0]}], max_tokens=12, temperature=0
        )
        return r.choices[0].message.content.strip()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, asks))
    refs = dict(cases)
    expected = offline(setup, [p for p, _ in asks], [refs[m] for _, m in asks], 12)
    assert got == expected
    assert len(set(got[:5])) > 1  # the adapters do change the answers


def test_greedy_completion_of_token_ids_equals_hf_generate(client, server, setup) -> None:
    model, tok = load_base(str(setup["base"]), dtype=torch.float32)
    am = AdaptedModel.from_pretrained(model, setup["dirs"]["alpha"], "alpha")
    ids = tok("once upon", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = am.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    expected = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    r = client.completions.create(model="alpha", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    assert r.choices[0].finish_reason == "length"


def test_streaming_chat_joins_to_the_whole_answer_with_usage_last(client, server, base_name) -> None:
    kw = dict(model="beta", messages=[{"role": "user", "content": "stream me"}], max_tokens=15, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    status, raw = http(server[0] + "/v1/chat/completions", {**kw, "stream": True})
    assert status == 200 and raw.endswith("data: [DONE]\n\n") and raw.startswith("data: {")


def test_stop_strings_cut_the_text_and_end_the_request(client, server) -> None:
    kw = dict(model="alpha", prompt="the quick brown", max_tokens=30, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[8:10]
    cut = full[: full.find(stop)]
    r = client.completions.create(**kw, stop=[stop, "\x00never"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens < 30  # the engine request was ended early
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    parts = [c.choices[0] for c in streamed]
    assert "".join(p.text for p in parts) == cut and parts[-1].finish_reason == "stop"


def test_n_choices_and_seeds_reproduce(client, server) -> None:
    kw = dict(
        model="reg", messages=[{"role": "user", "content": "sample"}], max_tokens=12, n=3, temperature=1
    )
    a = client.chat.completions.create(**kw, seed=123)
    b = client.chat.completions.create(**kw, seed=123)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed (seed + index)
    assert 3 <= a.usage.completion_tokens <= 36 and a.usage == b.usage


def test_a_batch_of_prompts_gives_n_choices_each(client, server) -> None:
    r = client.completions.create(model="beta", prompt=["one", "two three"], n=2, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert r.usage.prompt_tokens == len("one") + len("two three")  # a character tokenizer
    assert r.usage.completion_tokens == 20 and r.usage.total_tokens == 20 + 12


def test_logprobs_of_completions_and_chat(client, server, base_name) -> None:
    r = client.completions.create(model=base_name, prompt="abc", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0 and chosen == pytest.approx(max(top.values()), abs=1e-5)
    c = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == c.choices[0].message.content


def test_usage_counts_the_chat_template(client, server, setup, base_name) -> None:
    from peftkit.data.encode import encode_prompt
    from peftkit.data.example import Message

    _, tok = load_base(str(setup["base"]))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=base_name, messages=messages, max_tokens=3, temperature=0)
    expected = len(encode_prompt([Message(**m) for m in messages], tok))
    assert r.usage.prompt_tokens == expected and r.usage.completion_tokens <= 3


def test_a_promotion_is_served_from_the_next_request_without_restart(client, server, setup) -> None:
    kw = dict(messages=[{"role": "user", "content": "which version?"}], max_tokens=10, temperature=0)
    v1 = client.chat.completions.create(model="rollout", **kw).choices[0].message.content
    v2 = client.chat.completions.create(model="rollout@2", **kw).choices[0].message.content
    assert v1 != v2
    reg = Registry.open(setup["registry"], create=False)
    reg.promote("rollout@2", "production", force=True, user="t")
    assert client.chat.completions.create(model="rollout", **kw).choices[0].message.content == v2
    reg.rollback("rollout", user="t")
    assert client.chat.completions.create(model="rollout", **kw).choices[0].message.content == v1
    keys = {a["key"] for a in server[1].engine.adapters()}
    assert {"rollout@1", "rollout@2"} <= keys  # two versions, two cache entries


def test_health_and_ready(server) -> None:
    assert http(server[0] + "/health") == (200, {"status": "ok"})
    status, body = http(server[0] + "/ready")
    assert status == 200 and body["status"] == "ready"


# -- refused requests -------------------------------------------------------------------------------
def chat_body(**kw) -> dict:
    return {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


LONG = "x" * 70  # over max_prompt_tokens (60) with a character tokenizer
REFUSED = [
    ("chat", b"{not json", 400, None),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ("chat", chat_body(temperature="hot"), 400, None),
    ("chat", chat_body(temperature=3), 400, None),
    ("chat", chat_body(model="nope"), 404, "model_not_found"),
    ("chat", chat_body(model="alpha@9"), 404, "model_not_found"),
    ("chat", chat_body(model="reg@999"), 404, "model_not_found"),
    ("chat", chat_body(model="../../etc/passwd"), 404, "model_not_found"),
    ("chat", chat_body(model=str(Path(__file__).parent)), 404, "model_not_found"),
    ("chat", chat_body(model="http://example.com/adapter"), 404, "model_not_found"),
    ("chat", chat_body(model="alien"), 400, "adapter_load_failed"),
    ("chat", chat_body(messages=[]), 400, None),
    ("chat", chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, None),
    ("chat", chat_body(messages=[{"role": "user", "content": LONG}]), 400, None),
    ("chat", chat_body(max_tokens=41), 400, None),
    ("chat", chat_body(n=5), 400, None),
    ("chat", chat_body(stop=["a", "b", "c", "d", "e"]), 400, None),
    ("chat", chat_body(logit_bias={"1": 5}), 400, "unsupported"),
    ("chat", chat_body(seed=-1), 400, None),
    ("completions", {"model": "alpha", "prompt": LONG}, 400, None),
    ("completions", {"model": "alpha", "prompt": [10**9]}, 400, None),
    ("completions", {"model": "alpha", "prompt": "hi", "max_tokens": 0}, 400, None),
    ("completions", {"model": "alpha", "prompt": "hi", "max_tokens": 50}, 400, None),
    ("completions", {"model": "alpha", "prompt": "x" * 58, "max_tokens": 40}, 400, None),
    ("completions", {"model": "alpha", "prompt": "hi", "logprobs": 9}, 400, None),
    ("completions", {"model": "alpha", "prompt": "hi", "echo": True}, 400, "unsupported"),
    ("completions", {"model": "alpha", "prompt": []}, 400, None),
    ("completions", {"model": "alpha", "prompt": {"a": 1}}, 400, None),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "code"), REFUSED)
def test_refused_requests_get_openai_errors(server, endpoint, body, status, code) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    got, error = http(server[0] + path, body)
    assert got == status, error
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"] and "Traceback" not in error["error"]["message"]
    if code:
        assert error["error"]["code"] == code


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_without_a_json_content_type_is_told_to_send_one(server, content_type) -> None:
    """What curl -d sends (form-encoded), or no header at all: an OpenAI-shaped 400 that names the
    header, not a validation message about the body's shape."""
    body = json.dumps(chat_body()).encode()
    for path in ("/v1/chat/completions", "/v1/completions"):
        req = urllib.request.Request(server[0] + path, data=body, method="POST")
        req.remove_header("Content-type")  # urllib adds the form type to every POST with data
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("accepted")
        except urllib.error.HTTPError as e:
            status, error = e.code, json.loads(e.read())["error"]
        assert status == 400 and set(error) == {"message", "type", "param", "code"}
        assert (
            "Content-Type: application/json" in error["message"] and error["code"] == "unsupported_media_type"
        )


def test_a_404_lists_the_models_served(server, base_name) -> None:
    status, error = http(server[0] + "/v1/chat/completions", chat_body(model="alpah"))
    assert status == 404 and error["error"]["code"] == "model_not_found"
    assert error["error"]["message"] == (
        f"The model `alpah` does not exist. Models you can use: `{base_name}`, `alpha`, `beta`, `alien`, "
        "`reg`, `rollout`."
    )


def operations(schema: dict) -> dict[str, dict]:
    """{"METHOD /path": operation} of an OpenAPI schema."""
    return {f"{m.upper()} {p}": op for p, item in schema["paths"].items() for m, op in item.items()}


def test_openapi_documents_the_errors_sent_and_the_keys_taken(server) -> None:
    """/openapi.json describes what the server answers: no FastAPI 422 (invalid requests are 400s),
    every error as the OpenAI error body, Retry-After with 429 and 503, streaming as a second type of
    the completions' 200, and the keys as bearer security schemes. This server has no tenants (a key is
    optional on /v1, never a 401) and no admin key (every /admin call is a 403, never a 401)."""
    status, schema = http(server[0] + "/openapi.json")
    assert status == 200
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    schemes = schema["components"]["securitySchemes"]
    assert {k: (v["type"], v["scheme"]) for k, v in schemes.items()} == {
        "apiKey": ("http", "bearer"),
        "adminKey": ("http", "bearer"),
    }
    error = schema["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    ops = operations(schema)
    for name, op in ops.items():
        for code, response in op["responses"].items():
            if code != "200":
                assert response["content"] == {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                }, name
    for name in ("POST /v1/completions", "POST /v1/chat/completions"):
        responses = ops[name]["responses"]
        assert set(responses) == {"200", "400", "404", "429", "500", "503"}, name
        assert responses["429"]["headers"]["Retry-After"]["required"]
        assert responses["503"]["headers"]["Retry-After"]["required"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert ops[name]["security"] == [{"apiKey": []}, {}]
    assert {s for _, _, s, _ in REFUSED} <= {400, 404}  # (the refused requests above are documented)
    admin = [op for name, op in ops.items() if " /admin/" in name]
    assert admin and all(op["security"] == [{"adminKey": []}] for op in admin)
    assert all("403" in op["responses"] and "401" not in op["responses"] for op in admin)
    assert "security" not in ops["GET /health"]
    assert set(ops["GET /ready"]["responses"]) == {"200", "500", "503"}


def test_errors_reach_the_openai_client_and_leave_the_server_serving(client, server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="hi", max_tokens=2)
    for _ in range(3):
        with pytest.raises(openai.BadRequestError, match="another base|fingerprint"):
            client.completions.create(model="alien", prompt="hi", max_tokens=2)
    assert client.completions.create(model="alpha", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert http(server[0] + "/nowhere")[0] == 404
    status, body = http(server[0] + "/v1/completions", method="GET")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"


# -- the command --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{cfg}"], "unknown config key 'max_batch'"),
        (["--engine.max_bach", "2"], "unknown config key engine.'max_bach'|max_bach"),
        (["--engine.max_len", "0"], "max_len"),
        (["--max-n", "0"], "max_n"),
        (["--adapters", "x={missing}"], "no such adapter directory"),
        (["--registry", "{missing}"], "no registry"),
        (["--preload", "[nope@1]", "--registry", "{registry}"], "nope"),
    ],
)
def test_the_command_checks_its_inputs_before_loading_the_model(
    setup, tmp_path, capsys, args, message
) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_n: 2\nmax_batch: 4\n")
    fill = {"cfg": cfg, "missing": tmp_path / "missing", "registry": setup["registry"]}
    argv = ["serve", "--base", str(tmp_path / "no-model-here"), *[a.format(**fill) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert any(m in err for m in message.split("|")), err
    assert "no-model-here" not in err  # it stopped before looking for the model


@pytest.mark.parametrize("alien", ["alien={dir}", "--preload"])
def test_an_adapter_for_another_base_is_refused_with_advice_serve_can_take(setup, capsys, alien) -> None:
    """Not "pass --no-check-base", which serve does not take: a server never loads an adapter onto another
    base, so the advice is the base it was trained on (a directory) or the registry's record (a version)."""
    argv = [
        "serve",
        "--base",
        str(setup["base"]),
        "--port",
        str(free_port()),
        "--registry",
        str(setup["registry"]),
    ]
    if alien == "--preload":
        argv += ["--preload", "[alien@1]"]
    else:
        argv += ["--adapters", alien.format(dir=Path(setup["registry"]).parent / "alien")]
    assert main([*argv, "--engine.max_len", str(MAX_LEN)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: adapter 'alien") and "trained on" in error, error
    assert "no-check-base" not in error and "allow_other_base" not in error
    if alien == "--preload":
        assert "`peftkit registry show alien@1` names it" in error
    else:
        assert (
            "loads adapters only onto the base they were trained on: serve it from a server started with"
            in error
        )


def test_peftkit_serve_runs_and_finishes_requests_in_flight_on_sigterm(setup) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "peftkit", "serve", "--base", str(setup["base"]), "--port", str(port)]
    argv += ["--adapters", f"alpha={setup['dirs']['alpha']}", "--engine.max_len", str(MAX_LEN)]
    argv += ["--shutdown_deadline", "900"]  # the request in flight finishes, however slow the machine
    env = {**os.environ, "PEFTKIT_REGISTRY": str(setup["registry"]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert f"listening on http://127.0.0.1:{port}" in lines[0], lines
        assert "any key is accepted" in lines[2]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert "reg" in [m.id for m in client.models.list().data]  # the registry from $PEFTKIT_REGISTRY
        stream = client.completions.create(
            model="alpha", prompt="go", max_tokens=60, temperature=0, stream=True
        )
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert (rest or [first])[-1].choices[0].finish_reason == "length"
        assert proc.wait(900) == 0  # a stop signal is a clean, graceful exit
    finally:
        proc.kill()


def test_the_documented_config_loads_and_names_every_key(tmp_path) -> None:
    from peftkit.serve.commands import ServeConfig, field_help, load_serve_config

    doc = (Path(__file__).parents[1] / "docs" / "serve.md").read_text(encoding="utf-8")
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "serve.yaml").write_text(block)
    config, engine = load_serve_config(tmp_path / "serve.yaml", {"max_n": 2, "engine.max_batch": 4})
    assert (config.max_n, config.max_tokens, config.preload) == (2, 1024, ("support-bot@production",))
    assert (engine.max_batch, engine.max_len) == (4, 2048)
    documented = {line.split(":")[0].strip() for line in block.splitlines() if ":" in line}
    keys = {k.removeprefix("engine.") for k in field_help()}
    assert keys <= documented and documented - keys == {"engine"}
    assert isinstance(config, ServeConfig)
