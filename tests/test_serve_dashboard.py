"""The built-in /dashboard in a real headless Chromium (Debian's `chromium`), driven over the DevTools
protocol on a pipe: after known traffic the page shows every adapter and version with the numbers
/metrics has, live request rates move while traffic runs, canary splits appear where the server
provides them, the script raises nothing, and the page fetches nothing but this server's
/metrics.json. The page ships in the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import openai
import pytest
import test_serve_metrics as shared
from fastapi.responses import JSONResponse
from test_serve_http import free_port
from test_serve_metrics import K_REG, N_REG, ROOT, scrape, value

# test_serve_metrics' fixtures (module-scoped: this module runs its own server and known traffic)
metrics_setup, metrics_server, traffic = shared.metrics_setup, shared.metrics_server, shared.traffic

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: it reads
    NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4). One page."""

    def __init__(self, profile: Path) -> None:
        if not Path(CHROMIUM).exists():
            pytest.fail("Debian's chromium is not installed: `make setup` installs it as root "
                        "(apt-get install -y chromium)")  # fmt: skip
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]  # fmt: skip
        # bash puts the pipes on fds 3 and 4 (a plain exec: no preexec_fn in this threaded process)
        script = f'exec "$@" 3<&{to_browser} 4>&{from_browser}'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, "chromium", CHROMIUM, *flags],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.events: list[dict] = []
        self.replies: dict[int, dict] = {}
        self.arrived = threading.Condition()
        self.next_id = 0
        threading.Thread(target=self._reader, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Network", "Log", "Page"):
            self.call(f"{domain}.enable", session=self.session)

    def _reader(self) -> None:
        buffer = b""
        while chunk := os.read(self._read, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self.arrived:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self.replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self.arrived.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        command: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._write, json.dumps(command).encode() + b"\0")
        with self.arrived:
            if not self.arrived.wait_for(lambda: self.next_id in self.replies, timeout=900):
                raise TimeoutError(f"chromium did not answer {method}")
            reply = self.replies.pop(self.next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=self.session)  # fmt: skip
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 900) -> Any:
        """The expression's value once truthy (an error, as while the page loads, counts as not yet)."""
        end, last = time.monotonic() + timeout, None
        while time.monotonic() < end:
            try:
                if got := self.evaluate(expression):
                    return got
            except RuntimeError as e:
                last = e
            time.sleep(0.1)
        raise AssertionError(f"not true within {timeout} s: {expression} ({last})")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=self.session)

    def problems(self) -> list[str]:
        """Script exceptions, console and log errors (a blocked fetch, a CSP violation)."""
        out = []
        for e in list(self.events):
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"]))
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(json.dumps(p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"])
        return out

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in list(self.events)
                if e["method"] == "Network.requestWillBeSent"]  # fmt: skip

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._write)


@pytest.fixture
def browser(tmp_path: Path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


ROWS = """JSON.stringify([...document.querySelectorAll('#adapters tbody tr')].map(tr => ({
  adapter: tr.dataset.adapter, version: tr.dataset.version,
  cells: Object.fromEntries([...tr.cells].map(td => [td.dataset.k, td.textContent]))})))"""


def rows(browser: Browser) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["adapter"], r["version"]): r["cells"] for r in json.loads(browser.evaluate(ROWS))}


def test_the_dashboard_shows_every_adapter_and_version_with_the_metrics_numbers(
    browser, metrics_server, traffic
) -> None:
    url = metrics_server[0]
    browser.goto(url + "/dashboard?every=300")
    browser.wait_for("Number(document.body.dataset.polls) >= 2")
    shown, m = rows(browser), scrape(url)
    assert set(shown) == {("", ""), ("reg", "1"), ("reg", "2"), ("alpha", ""), ("alien", "1")}
    for (adapter, version), cells in shown.items():
        labels = dict(adapter=adapter, version=version)
        assert cells["requests"] == str(int(value(m, "peftkit_requests_total", **labels)))
        assert cells["loads"] == str(int(value(m, "peftkit_adapter_loads_total", **labels, result="ok")))
        assert cells["hits"] == str(int(value(m, "peftkit_adapter_cache_hits_total", **labels)))
        assert cells["evictions"] == str(int(value(m, "peftkit_adapter_evictions_total", **labels)))
        assert cells["rate"] == "0.00"  # no traffic while the page polls
    reg1 = shown[("reg", "1")]
    assert (reg1["requests"], reg1["loads"], reg1["hits"], reg1["evictions"]) == (
        str(N_REG),
        "1",
        str(N_REG - 1),
        "1",
    )
    assert reg1["slot"] == "–" and shown[("reg", "2")]["slot"] != "–"  # evicted / resident
    assert reg1["latency_p50"].endswith(" ms") and reg1["ttft_p50"].endswith(" ms")
    assert shown[("alien", "1")]["errors"] == "1" and shown[("", "")]["adapter"] == "(base model)"
    text = browser.evaluate("document.body.innerText")
    assert "No canary splits are configured" in text and "rows: 4" in text
    assert "HTTP 404: 1" in text and "HTTP 400: 1" in text  # refused before the engine: counted by status
    assert browser.problems() == []
    assert set(browser.requested()) == {url + "/dashboard?every=300", url + "/metrics.json"}


def test_live_rates_and_canary_splits_appear_while_the_server_runs(browser, metrics_server, traffic) -> None:
    url, prepared, metrics = metrics_server
    served = metrics.views.get("splits")  # the server's own view, when it has canary routes
    metrics.views["splits"] = lambda: [
        {"model": "reg", "versions": {"reg@1": 90, "reg@2": 10}, "sticky": "user"}
    ]
    try:
        browser.goto(url + "/dashboard?every=250")
        browser.wait_for("Number(document.body.dataset.polls) >= 1")
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stop, base = threading.Event(), prepared.catalog.base_names[0]  # the base: no cache changes

        def send() -> None:
            while not stop.is_set():
                client.completions.create(model=base, prompt=[5, 6], max_tokens=K_REG, temperature=0)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            rate = """(() => { const tr = document.querySelector('#adapters tr[data-adapter=""][data-version=""]');
                       const r = Number(tr.querySelector('[data-k=rate]').textContent);
                       return r > 0 ? r : 0; })()"""
            assert browser.wait_for(rate) > 0
        finally:
            stop.set()
            sender.join(30)
        splits = browser.evaluate("document.getElementById('splits').innerText")
        assert "reg@1" in splits and "90" in splits and "sticky" in splits
        assert browser.problems() == []
    finally:
        metrics.views.pop("splits")
        if served is not None:
            metrics.views["splits"] = served


def test_monitor_results_and_feedback_appear(browser, metrics_setup, metrics_server, traffic) -> None:
    """The registry's newest monitor results (alerting first) and the feedback counters, as drawn (the
    fixture's registry holds a drift, a re-evaluation and an A/B result already; these replace two)."""
    import urllib.request

    from peftkit.registry import Registry
    from peftkit.registry.watch import add_result

    url = metrics_server[0]
    reg = Registry.open(metrics_setup["registry"])
    signals = [{"signal": "prompt_length", "statistic": 0.9, "threshold": 0.25, "alert": True},
               {"signal": "representation", "statistic": 0.001, "threshold": 0.02, "alert": False}]  # fmt: skip
    add_result(reg.db, "reeval", "reg", "1", False, {"metric": "exact_match", "score": 0.875})
    add_result(reg.db, "drift", "reg", "1", True, {"signals": signals})
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    ids = [client.completions.create(model="alpha", prompt=[5, 6], max_tokens=2).id for _ in range(3)]
    for response_id, label in zip(ids, ("up", "up", "down")):
        body = json.dumps({"id": response_id, "label": label}).encode()
        req = urllib.request.Request(url + "/v1/feedback", body, {"Content-Type": "application/json"})
        assert urllib.request.urlopen(req, timeout=30).status == 200
    browser.goto(url + "/dashboard?every=250")
    table = """JSON.stringify([...document.querySelectorAll('#ID tbody tr')].map(tr =>
               Object.fromEntries([...tr.cells].map(td => [td.dataset.k, td.textContent]))))"""
    monitor = json.loads(browser.wait_for(f"(() => {{ const t = {table.replace('ID', 'monitor')}; "
                                          "return t.includes('0.875') && t; })()", timeout=60))  # fmt: skip
    assert [(r["kind"], r["adapter"], r["alert"], r["summary"]) for r in monitor] == [
        ("drift", "reg", "ALERT", "prompt_length"), ("ab", "support", "ALERT", "rollback"),
        ("reeval", "reg", "ok", "exact_match 0.875"),
    ]  # alerting first, newest first; the fixture's older drift and reeval of reg@1 are replaced  # fmt: skip
    feedback = json.loads(browser.wait_for(table.replace("ID", "feedback")))
    assert [(r["adapter"], r["up"], r["down"], r["up share"]) for r in feedback] == [
        ("alpha", "3", "1", "0.75")
    ]
    assert browser.problems() == []


def _engine_with_bot_7(tmp_path: Path):
    """A real engine on a tiny model with one adapter resident under the key bot@7."""
    import asyncio

    import torch
    from conftest import tiny_llama

    from peftkit import AdaptedModel, LoraConfig
    from peftkit.serve.engine import Engine, EngineConfig

    torch.manual_seed(0)
    model = tiny_llama()
    adapter = AdaptedModel.attach(model, LoraConfig(r=2)).save_adapter(tmp_path / "bot7")
    torch.manual_seed(0)
    model = tiny_llama()  # the same base, without the adapter
    engine = Engine.start(model, None, {"bot@7": adapter}.get, EngineConfig(max_len=32, adapter_slots=1))
    asyncio.run(engine.load("bot@7"))
    return engine


def test_with_api_keys_the_dashboard_asks_for_the_admin_key(browser, tmp_path: Path) -> None:
    """With tenants, /metrics.json answers only the admin key: the page asks for it and sends it."""
    import uvicorn
    from fastapi import FastAPI

    from peftkit.serve.metrics import install_metrics

    app = FastAPI()
    engine = _engine_with_bot_7(tmp_path)
    install_metrics(app, engine)

    @app.middleware("http")
    async def admin_only(request, call_next):  # as the server does for /metrics with keys configured
        if request.url.path == "/metrics.json" and request.headers.get("authorization") != "Bearer adm":
            return JSONResponse({"error": {"message": "admin key needed"}}, status_code=401)
        return await call_next(request)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        browser.goto(f"http://127.0.0.1:{port}/dashboard?every=200")
        browser.wait_for("!document.getElementById('login').hidden")
        assert "only the admin key" in browser.evaluate("document.getElementById('status').textContent")
        browser.evaluate("document.getElementById('key').value = 'adm'; "
                         "document.getElementById('login').requestSubmit(); true")  # fmt: skip
        browser.wait_for("Number(document.body.dataset.polls) >= 1")
        assert ("bot", "7") in rows(browser) and browser.evaluate("document.getElementById('login').hidden")
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop(1)


def test_the_dashboard_is_self_contained(metrics_server) -> None:
    import urllib.request

    with urllib.request.urlopen(metrics_server[0] + "/dashboard", timeout=30) as r:
        csp, page = r.headers["Content-Security-Policy"], r.read().decode()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http://" not in page and "https://" not in page and "<script src" not in page


def test_the_dashboard_ships_in_the_wheel(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("peftkit-*.whl")
    assert "peftkit/serve/dashboard.html" in zipfile.ZipFile(wheel).namelist()
