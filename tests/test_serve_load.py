"""A bounded load test of `peftkit serve`: the real server on 127.0.0.1 with 64 adapters (LoRA, rsLoRA,
DoRA, IA³) of a tiny saved Llama, asked by 32 concurrent clients (the real `openai` client, one per
thread) for a fixed number of greedy completions whose adapters follow a power law (Zipf, s=1). The
engine holds fewer adapters than the workload names, so adapters are evicted and loaded again while
requests run. Every response is checked against offline generation with the same adapter (fp32, HF's
`generate` over peftkit's AdaptedModel), token for token through the text, the finish reason and the
usage; nothing may fail. Then 50 requests in a row name adapters whose files went bad while good
traffic runs beside them: each bad one gets an OpenAI-style 4xx, every good one is still exact."""

from __future__ import annotations

import asyncio
import copy
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from test_serve_http import served_app

from peftkit import AdaptedModel, IA3Config, LoraConfig
from peftkit.base import load_base, model_fingerprint
from peftkit.serve.commands import ServeConfig, prepare

ADAPTERS = 64
CLIENTS = 32
REQUESTS = 256
MAX_LEN = 64
BAD = ["corrupt", "truncated", "other-base"]  # configured directories whose files go bad after start


def config_for(i: int):
    """Mostly LoRA r=2; every 8th rsLoRA, DoRA or IA³."""
    kind = i % 8
    if kind == 5:
        return LoraConfig(r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False)
    if kind == 6:
        return LoraConfig(r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    if kind == 7:
        return IA3Config(init_ia3_weights=False)
    return LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules="all-linear")


def save_adapter(model: torch.nn.Module, config, out: Path, seed: int) -> Path:
    """An adapter strong enough to change the tokens it generates, saved in the PEFT format."""
    torch.manual_seed(seed)
    am = AdaptedModel.attach(copy.deepcopy(model), config)
    with torch.no_grad():
        for key, p in am.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p)) if "ia3" in key else p.mul_(3.0)
    return am.save_adapter(out)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """64 good adapter directories and three that will go bad (good until the server has started)."""
    root = tmp_path_factory.mktemp("load")
    model, tok = load_base(str(tiny_model_dir), dtype=torch.float32)
    dirs = {
        f"a{i:02d}": save_adapter(model, config_for(i), root / f"a{i:02d}", 100 + i) for i in range(ADAPTERS)
    }
    bad = {name: save_adapter(model, config_for(0), root / name, 900 + i) for i, name in enumerate(BAD)}
    return {"base": tiny_model_dir, "model": model, "tok": tok, "dirs": dirs, "bad": bad, "root": root}


@pytest.fixture(scope="module")
def server(setup: dict):
    """The real server (uvicorn in a thread) with 8 rows and 8 adapter slots for 67 adapters; an event
    log of the engine's adapter loads and evictions."""
    from peftkit.serve.engine import EngineConfig

    adapters = [f"{n}={d}" for n, d in {**setup["dirs"], **setup["bad"]}.items()]
    engine_config = EngineConfig(
        max_len=MAX_LEN, max_batch=8, chunk=16, adapter_slots=8, max_rank=2, max_queue=512
    )
    prepared = prepare(str(setup["base"]), adapters, None, ServeConfig(shutdown_deadline=2), engine_config)
    events: list[tuple[str, dict]] = []
    prepared.engine.add_listener(lambda name, data: events.append((name, data)))
    with served_app(prepared.app) as url:
        yield url + "/v1", prepared, events
    assert not prepared.engine.running


def workload(count: int, names: list[str | None], seed: int) -> list[tuple[str | None, list[int], int]]:
    """`count` requests (adapter, prompt ids, max_tokens): adapters drawn with Zipf (s=1) popularity in
    the order given, prompts of 1 to 40 ids from a pool of 24, 1 to 8 tokens each."""
    rng = random.Random(seed)
    pool = [[rng.randrange(4, 100) for _ in range(rng.randint(1, 40))] for _ in range(24)]
    weights = [1 / (k + 1) for k in range(len(names))]
    return [(m, rng.choice(pool), rng.randint(1, 8)) for m in rng.choices(names, weights, k=count)]


def offline(setup: dict, requests: list[tuple[str | None, list[int], int]], dirs: dict) -> dict:
    """{(adapter, prompt, max_tokens): greedy tokens} from HF's `generate` over peftkit's AdaptedModel,
    each adapter on its own copy of the fp32 base, ending at the end-of-sequence token as the server
    does."""
    model, eos = setup["model"], setup["tok"].eos_token_id
    out: dict = {}
    for name in dict.fromkeys(m for m, _, _ in requests):
        am = model if name is None else AdaptedModel.from_pretrained(copy.deepcopy(model), dirs[name])
        for m, prompt, n in requests:
            key = (m, tuple(prompt), n)
            if m != name or key in out:
                continue
            with torch.no_grad():
                ids = am.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=n,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=0,
                )
            out[key] = ids[0, len(prompt) :].tolist()
    return out


def ask(
    client: openai.OpenAI, base: str, request: tuple[str | None, list[int], int]
) -> tuple[str, str, tuple]:
    model, prompt, n = request
    r = client.completions.create(model=model or base, prompt=prompt, max_tokens=n, temperature=0)
    usage = (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)
    return r.choices[0].text, r.choices[0].finish_reason, usage


def expected(setup: dict, request: tuple, tokens: list[int]) -> tuple[str, str, tuple]:
    _, prompt, n = request
    finish = "stop" if tokens and tokens[-1] == setup["tok"].eos_token_id else "length"
    assert finish == "stop" or len(tokens) == n
    usage = (len(prompt), len(tokens), len(prompt) + len(tokens))
    return setup["tok"].decode(tokens, skip_special_tokens=True), finish, usage


def run_clients(url: str, base: str, requests: list, clients: int) -> tuple[list, list[float]]:
    """Each of `clients` threads with its own openai client takes the next request until none is left:
    the answers (or exceptions) in request order, and when each came back (perf_counter)."""
    results: list = [None] * len(requests)
    times = [0.0] * len(requests)
    todo = iter(range(len(requests)))
    lock = threading.Lock()

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url, api_key="load", max_retries=0, timeout=900)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = ask(client, base, requests[i])
            except Exception as e:  # noqa: BLE001 (every failure is reported by the test)
                results[i] = e
            times[i] = time.perf_counter()

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client_loop) for _ in range(clients)]:
            f.result()
    return results, times


def test_power_law_traffic_over_64_adapters_equals_offline_generation(setup, server) -> None:
    """256 requests from 32 clients over 64 adapters and the base (Zipf popularity), 8 rows and 8
    adapter slots: every answer is offline generation's (text, finish reason, usage), none failed, and
    the workload did evict adapters and load them again."""
    url, prepared, events = server
    base = prepared.catalog.base_names[0]
    names = [*setup["dirs"], None]  # the base is asked for too, least often
    requests = workload(REQUESTS, names, seed=0)
    start = len(events)
    got, _ = run_clients(url, base, requests, CLIENTS)
    failures = [(r, g) for r, g in zip(requests, got) if isinstance(g, Exception)]
    assert not failures, failures[:3]
    refs = offline(setup, requests, setup["dirs"])
    for request, answer in zip(requests, got):
        tokens = refs[(request[0], tuple(request[1]), request[2])]
        assert answer == expected(setup, request, tokens), (request, tokens)
    # the workload did what it is for: many adapters, changed tokens, adapters evicted and loaded again
    used = {m for m, _, _ in requests}
    assert len(used) >= 40
    by_prompt: dict = {}
    for (_, prompt, n), tokens in refs.items():
        by_prompt.setdefault((prompt, n), set()).add(tuple(tokens))
    assert any(len(outs) > 1 for outs in by_prompt.values())
    loads = [d["adapter"] for name, d in events[start:] if name == "adapter_load"]
    evicted = [d["adapter"] for name, d in events[start:] if name == "adapter_evict"]
    assert len(evicted) >= 16 and len(loads) > len(set(loads))  # some adapters were loaded twice


def break_adapters(setup: dict, prepared) -> None:
    """Make the three bad directories bad (a config that is not JSON, weights cut short, an adapter of
    another base with the same shapes), and drop those still resident from the engine, so the next
    request loads them again (the server read them all at start)."""
    bad = setup["bad"]
    (bad["corrupt"] / "adapter_config.json").write_text("{not json")
    weights = bad["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    torch.manual_seed(1234)
    other, _ = load_base(str(setup["base"]), dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model_fingerprint(other, refresh=True)  # load_base cached the saved model's
    save_adapter(other, config_for(0), bad["other-base"], 5)
    resident = {a["key"] for a in prepared.engine.adapters()}
    for name in resident & set(BAD):
        asyncio.run(prepared.engine.unload(name))


def test_fifty_bad_adapter_requests_in_a_row_do_not_disturb_good_traffic(setup, server) -> None:
    """One client asks for the three bad adapters 50 times in a row while 16 clients send 128 good
    requests: each bad request is a 400 in OpenAI's shape naming the adapter (its load was tried and
    failed), each good one equals offline generation, and the two streams overlapped."""
    url, prepared, events = server
    base = prepared.catalog.base_names[0]
    break_adapters(setup, prepared)
    good = workload(128, [*setup["dirs"], None], seed=1)
    bad: list = []
    started = threading.Barrier(2)
    start = len(events)

    def bad_in_a_row() -> None:
        client = openai.OpenAI(base_url=url, api_key="load", max_retries=0, timeout=900)
        started.wait()
        for i in range(50):
            name = BAD[i % len(BAD)]
            try:
                client.completions.create(model=name, prompt=[5, 6, 7], max_tokens=3, temperature=0)
            except openai.APIStatusError as e:
                bad.append((name, e.status_code, e.response.json(), time.perf_counter()))
            else:
                bad.append((name, 200, None, time.perf_counter()))

    thread = threading.Thread(target=bad_in_a_row)
    thread.start()
    started.wait()
    got, done = run_clients(url, base, good, 16)
    thread.join(900)
    assert len(bad) == 50
    for name, status, body, _ in bad:
        assert status == 400, (name, status, body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert (body["error"]["code"], body["error"]["param"]) == ("adapter_load_failed", "model")
        assert f"'{name}'" in body["error"]["message"] and "Traceback" not in body["error"]["message"]
    failed = [d["adapter"] for name, d in events[start:] if name == "adapter_load" and not d["ok"]]
    assert set(failed) == set(BAD)
    first, last = bad[0][3], bad[-1][3]
    assert sum(first < t < last for t in done) >= 8  # good answers came back between the bad ones
    failures = [(r, g) for r, g in zip(good, got) if isinstance(g, Exception)]
    assert not failures, failures[:3]
    refs = offline(setup, good, setup["dirs"])
    for request, answer in zip(good, got):
        assert answer == expected(setup, request, refs[(request[0], tuple(request[1]), request[2])]), request
    assert openai.OpenAI(base_url=url, api_key="k").models.list().data  # still serving


def test_a_failed_load_names_the_adapter_but_no_server_path(setup, server) -> None:
    """A client names adapters, never paths: the error for a bad adapter must not show where the
    server keeps its adapters or its base model, nor a Python-API hint meant for the operator."""
    url, prepared, _ = server
    if not (setup["bad"]["corrupt"] / "adapter_config.json").read_text().startswith("{not"):
        break_adapters(setup, prepared)
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    for name in BAD:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=name, prompt=[5, 6], max_tokens=2)
        message = caught.value.response.json()["error"]["message"]
        assert name in message
        for secret in (str(setup["root"]), str(setup["base"]), "check_base"):
            assert secret not in message, (name, message)
