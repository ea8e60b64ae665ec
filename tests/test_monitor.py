"""`peftkit monitor` on a tiny saved Llama and a real registry: drift alerts on a shifted window and not
on an in-distribution one (against captured traffic and against a gate's eval set), re-evaluation
catches a worse version forced into production, A/B decisions are right on known differences and keep
their false-positive rate on none, a rollback lands in the audit log the servers route by, and the
server exports the newest results as metrics."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from test_serve_http import save_adapter, served_app
from test_serve_metrics import scrape, value

from peftkit.errors import RegistryError
from peftkit.monitor.ab import ab_decision, decide
from peftkit.monitor.drift import check_drift
from peftkit.monitor.reeval import reevaluate
from peftkit.monitor.stats import two_proportions
from peftkit.registry import Registry
from peftkit.registry.gate import Gate
from peftkit.registry.traffic import Feedback, Sample, add_samples
from peftkit.registry.watch import Watch, results, set_watch

WORDS = ["date", "when", "the", "meeting", "is", "on", "march", "friday", "noon", "next"]


def words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


def noise(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789+-*/=") for _ in range(rng.randint(30, 60)))


def traffic(i: int, prompt: str, output: str, *, name: str = "a", version: str = "", model: str = "a",
            latency: float = 0.1, text: bool = True) -> Sample:  # fmt: skip
    return Sample.of(
        prompt, output, keep_text=text, response_id=f"r-{name}-{version}-{i}", choice=0, at=time.time(),
        name=name, version=version, model=model, tenant="", kind="completion", prompt_tokens=len(prompt),
        output_tokens=len(output), finish_reason="stop", latency=latency, ttft=latency / 4,
    )  # fmt: skip


def store(reg: Registry, rows: list[Sample]) -> None:
    add_samples(reg.db, rows, max_rows=10**6, max_bytes=10**10)


def iso(rng: random.Random) -> str:
    return f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"


# -- drift ------------------------------------------------------------------------------------------------
def test_drift_alerts_on_a_shifted_window_and_not_on_an_in_distribution_one(tiny_model_dir, tmp_path) -> None:
    rng = random.Random(0)
    reg = Registry.open(tmp_path / "reg")
    set_watch(reg.db, "a", Watch(valid_regex=r"\d{4}-\d{2}-\d{2}", window=80))
    store(reg, [traffic(i, words(rng), iso(rng)) for i in range(240)])
    calm = check_drift(reg, "a", base=str(tiny_model_dir))
    assert not calm["alert"], [s for s in calm["signals"] if s["alert"]]  # no false alarm
    assert calm["reference"]["n"] == 160 and calm["window"]["n"] == 80
    store(reg, [traffic(1000 + i, noise(rng), "I'm sorry, I can't") for i in range(80)])
    shifted = check_drift(reg, "a", base=str(tiny_model_dir))
    fired = {s["signal"] for s in shifted["signals"] if s["alert"]}
    assert {"prompt_length", "representation", "validity_rate", "refusal_rate"} <= fired
    for s in shifted["signals"]:
        assert {"statistic", "threshold", "alert"} <= set(s) and isinstance(s["alert"], bool)
    recorded = results(reg.db, "a", "drift")
    assert [r.alert for r in recorded] == [False, True] and recorded[-1].result == json.loads(
        json.dumps(shifted)
    )
    (entry,) = [e for e in reg.history("a") if e.action == "alert"]  # the alert is in the audit log too
    assert entry.details["kind"] == "drift" and entry.details["result"] == recorded[-1].id
    assert entry.details["why"].startswith("drift: ") and reg.check() == []
    page = tmp_path / "a.html"
    cli = [sys.executable, "-m", "peftkit", "monitor", "report", "a", "--html", str(page), "--registry",
           str(tmp_path / "reg")]  # fmt: skip
    assert subprocess.run(cli, capture_output=True, timeout=300).returncode == 0
    text = page.read_text()
    assert text.count("<svg") == 1 + len(shifted["signals"]) + 1  # the score, each drift signal, feedback
    assert all(f"drift: {s['signal']}" in text for s in shifted["signals"])
    assert (
        text.count('class="alert">ALERT') == len(fired) and "watch" in text
    )  # the newest check; the audit log
    assert "<script" not in text and not re.search(r"(src|href)=\"https?:", text)  # nothing is fetched
    again = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists; give --overwrite" in again.stderr and page.read_text() == text


def test_drift_against_the_gate_eval_set_and_with_hashes_only(tiny_model_dir, tmp_path) -> None:
    rng = random.Random(1)
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": words(rng), "completion": iso(rng)}) + "\n" for _ in range(60))
    )
    reg = Registry.open(tmp_path / "reg")
    reg.set_gate("a", Gate(str(data), n=60))
    store(reg, [traffic(i, noise(rng) * 4, iso(rng), text=False) for i in range(40)])
    result = check_drift(reg, "a", window=40, base=str(tiny_model_dir), record=False)
    assert result["reference"]["what"].startswith("the gate eval set stored:sha256:")
    assert [s["signal"] for s in result["signals"]] == ["prompt_length", "output_length", "length_stop_rate"]
    assert set(result["skipped"]) == {"prompt_perplexity", "representation", "empty_rate", "refusal_rate",
                                      "validity_rate"}  # fmt: skip
    assert result["signals"][0]["alert"]  # this noise is far longer than the rendered eval prompts


def test_drift_names_what_is_missing(tiny_model_dir, tmp_path) -> None:
    reg = Registry.open(tmp_path / "reg")
    with pytest.raises(RegistryError, match="has 0 captured samples.*--capture"):
        check_drift(reg, "a", base=str(tiny_model_dir))
    store(reg, [traffic(i, "x y", "z") for i in range(30)])
    with pytest.raises(RegistryError, match="no gate eval set and only 0 samples before the window"):
        check_drift(reg, "a", window=30, base=str(tiny_model_dir))


# -- re-evaluation ----------------------------------------------------------------------------------------
def test_reevaluation_catches_a_worse_version_forced_into_production(tiny_model_dir, tmp_path) -> None:
    """v1's own greedy answers are the gate's gold answers: v1 scores 1 and passes its gate; v2 (another
    random adapter), forced into production, scores far lower and the re-evaluation alerts."""
    from peftkit.policy import promote
    from peftkit.policy.promotion import evaluate_on_gate

    reg = Registry.open(tmp_path / "reg")
    v1 = reg.register("bot", save_adapter(tiny_model_dir, tmp_path / "v1", 1))
    v2 = reg.register("bot", save_adapter(tiny_model_dir, tmp_path / "v2", 2))
    rng = random.Random(2)
    prompts = [words(rng) for _ in range(12)]
    draft = tmp_path / "draft.jsonl"
    draft.write_text("".join(json.dumps({"prompt": p, "completion": "?"}) + "\n" for p in prompts))
    gate = Gate(str(draft), metric="exact_match", n=12, max_new_tokens=6, base=str(tiny_model_dir))
    _, _, _, report = evaluate_on_gate(gate, str(tiny_model_dir), [("v1", reg.resolve(v1.ref))])
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n"
                            for p, a in zip(prompts, report["v1"].predictions)))  # fmt: skip
    reg.set_gate(
        "bot", Gate(str(gold), metric="exact_match", n=12, max_new_tokens=6, base=str(tiny_model_dir))
    )
    promote(reg, v1.ref, "production")
    good = reevaluate(reg, "bot")
    assert (good["score"], good["alert"], good["reference"]["score"]) == (1.0, False, 1.0)
    promote(reg, v2.ref, "production", force=True)
    bad = reevaluate(reg, "bot")
    assert bad["version"] == "2" and bad["score"] < 0.5 and bad["alert"]
    assert bad["reference"] == {"score": 1.0, "what": "the re-evaluation of bot@1"}
    assert [r.version for r in results(reg.db, "bot", "reeval")] == ["1", "2"]


# -- A/B decisions ----------------------------------------------------------------------------------------
def feedback_measure(rng: np.random.Generator, p_a: float, p_b: float, n: int) -> dict:
    return {**two_proportions(rng.binomial(n, p_a), n, rng.binomial(n, p_b), n).to_dict(), "better": 1}


def test_ab_decides_known_differences_and_rarely_declares_one_that_is_not_there() -> None:
    rng = np.random.default_rng(0)
    runs = 400
    same = [decide({"feedback": feedback_measure(rng, 0.6, 0.6, 300),
                    "validity": feedback_measure(rng, 0.9, 0.9, 300)}, 0.05, 0.05)["decision"]
            for _ in range(runs)]  # fmt: skip
    false_positive = sum(d != "continue" for d in same) / runs
    assert false_positive <= 0.065  # alpha 0.05 shared by two guards; the simulation's error on top
    worse = [
        decide({"feedback": feedback_measure(rng, 0.7, 0.5, 400)}, 0.05, 0.05)["decision"] for _ in range(50)
    ]
    better = [
        decide({"feedback": feedback_measure(rng, 0.5, 0.7, 400)}, 0.05, 0.05)["decision"] for _ in range(50)
    ]
    assert worse.count("rollback") >= 48 and better.count("promote") >= 48
    few = decide({"feedback": feedback_measure(rng, 0.7, 0.1, 10)}, 0.05, 0.05)
    assert few["decision"] == "continue"  # 10 per arm decides nothing, however large the gap looks


def canary_traffic(reg: Registry, seed: int = 3) -> None:
    """Route `support` split 50/50 between bot@1 and bot@2, with 120 captured requests each: users like
    bot@1's answers 80% of the time, bot@2's 45%."""
    from peftkit.registry.traffic import put_feedback
    from peftkit.serve.routes import Split, audit_route

    audit_route(reg, "support", None, Split("bot@1", "bot@2", 50), "ops", "start the canary")
    rng = random.Random(seed)
    rows = []
    for i in range(240):
        version = "1" if i % 2 else "2"
        rows.append(traffic(i, words(rng), iso(rng), name="bot", version=version, model="support",
                            latency=0.1 + 0.01 * rng.random()))  # fmt: skip
    store(reg, rows)
    for row in rows:
        up = rng.random() < (0.8 if row.version == "1" else 0.45)
        put_feedback(reg.db, Feedback(row.response_id, time.time(), "bot", row.version, "support", "",
                                      1.0 if up else -1.0, "up" if up else "down"))  # fmt: skip


def test_ab_on_a_route_rolls_back_a_worse_canary_in_the_audit_log(tmp_path) -> None:
    reg = Registry.open(tmp_path / "reg")
    canary_traffic(reg)
    result = ab_decision(reg, "support")
    assert result["decision"] == "rollback" and "feedback" in result["reason"]
    assert result["requests"] == {"stable": 120, "canary": 120}
    m = result["measures"]["feedback"]
    assert m["difference"] < 0 and m["p"] < 0.01 and m["low"] < m["difference"] < m["high"]
    code = subprocess.run(
        [sys.executable, "-m", "peftkit", "monitor", "ab", "support", "--rollback", "--registry", str(tmp_path / "reg"),
         "--json"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr
    assert json.loads(code.stdout)["rolled_back"]["details"]["after"] == {"stable": "bot@1", "canary": None,
                                                                         "canary_percent": 0.0}  # fmt: skip
    last = [e for e in reg.history("support") if e.action == "route"][-1]
    assert last.details["after"]["canary"] is None and "peftkit monitor ab" in last.details["reason"]
    with pytest.raises(RegistryError, match="has no canary now"):
        ab_decision(reg, "support")


# -- the command line and the server ------------------------------------------------------------------------
def test_monitor_run_reports_a_registry_that_is_down_then_catches_up(tiny_model_dir, tmp_path) -> None:
    down = f"postgresql://postgres@/nothing?host={tmp_path / 'no-server'}&files={tmp_path / 'files'}"
    (tmp_path / "files").mkdir()
    r = subprocess.run([sys.executable, "-m", "peftkit", "monitor", "run", "--registry", down],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "cannot connect to the registry database" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith(
        "error: cannot connect to the registry database"
    )
    reg = Registry.open(tmp_path / "reg")
    rng = random.Random(4)
    store(reg, [traffic(i, words(rng), iso(rng)) for i in range(40)])
    set_watch(reg.db, "a", Watch(window=20))
    r = subprocess.run(
        [sys.executable, "-m", "peftkit", "monitor", "run", "--registry", str(tmp_path / "reg"), "--base",
         str(tiny_model_dir), "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr  # it ran, and nothing alerts: one distribution throughout
    report = json.loads(r.stdout)
    assert report["errors"] == {} and report["alerts"] == [] and set(report["drift"]) == {"a"}
    assert len(results(reg.db, "a", "drift")) == 1


def test_the_server_exports_the_newest_monitor_results(tiny_model_dir, tmp_path) -> None:
    from peftkit.serve.commands import ServeConfig, prepare
    from peftkit.serve.engine import EngineConfig

    reg = Registry.open(tmp_path / "reg")
    rng = random.Random(5)
    store(reg, [traffic(i, words(rng), iso(rng)) for i in range(60)])
    store(reg, [traffic(100 + i, noise(rng), iso(rng)) for i in range(30)])
    check_drift(reg, "a", window=30, base=str(tiny_model_dir))
    alpha = save_adapter(tiny_model_dir, tmp_path / "alpha", 1)
    prepared = prepare(str(tiny_model_dir), [f"a={alpha}"], str(tmp_path / "reg"), ServeConfig(),
                       EngineConfig(max_len=64, max_batch=2))  # fmt: skip
    with served_app(prepared.app) as url:
        metrics = scrape(url)
        snapshot = json.loads(urllib.request.urlopen(url + "/metrics.json", timeout=30).read())
    assert value(metrics, "peftkit_drift_alert", adapter="a", version="", signal="prompt_length") == 1
    assert value(metrics, "peftkit_drift_threshold", adapter="a", signal="prompt_length") == 0.25
    assert value(metrics, "peftkit_monitor_checked_timestamp_seconds", kind="drift", adapter="a") > 0
    (drift,) = snapshot["monitor"]
    assert drift["kind"] == "drift" and drift["alert"] and drift["signals"]["prompt_length"][2] is True


def test_the_servers_own_schedule_rolls_back_a_worse_canary_it_routes(tiny_model_dir, tmp_path) -> None:
    from test_monitor_capture import wait_for

    from peftkit.serve.commands import ServeConfig, prepare
    from peftkit.serve.engine import EngineConfig

    reg = Registry.open(tmp_path / "reg")
    for seed in (1, 2):
        reg.register("bot", save_adapter(tiny_model_dir, tmp_path / f"bot{seed}", seed))
    canary_traffic(reg)
    config = ServeConfig(monitor_every=0.5, monitor_rollback=True, monitor_nice=0)  # (a busy CI machine)
    prepared = prepare(
        str(tiny_model_dir), [], str(tmp_path / "reg"), config, EngineConfig(max_len=64, max_batch=2)
    )
    assert prepared.routes.get("support").canary == "bot@2"
    with served_app(prepared.app) as url:
        rolled = wait_for(lambda: prepared.routes.get("support").canary is None, timeout=240)
        ran = wait_for(
            lambda: value(scrape(url), "peftkit_monitor_runs_total", result="alert") >= 1, timeout=60
        )
    print(
        "DBG",
        [(e.seq, e.details) for e in reg.history("support")],
        prepared.routes.splits,
        prepared.routes._feed.seq,
    )
    assert rolled  # the run rolled it back in the audit log, and this server routes by that log
    last = [e for e in reg.history("support") if e.action == "route"][-1]
    assert (
        last.details["after"]["canary"] is None
        and "significantly worse on feedback" in last.details["reason"]
    )
    assert ran  # the run that rolled back ended with exit 1 (an alert), counted by the server
