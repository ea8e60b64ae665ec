"""Monitoring end to end on the built-in model (SmolLM2-135M-Instruct), as docs/monitor.md runs it: a
dates adapter (trained once per test run, conftest.py) registered with a gate and an ISO-date validity check, served by the
real server with capture on; two windows of dates traffic raise no drift alarm, a window of another
task's traffic does (and the alert metric changes); a worse version forced into production is caught
by the re-evaluation. About two minutes, most of it generating and scoring (plus the shared training)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_monitor_capture import wait_for
from test_serve_http import served_app
from test_serve_metrics import scrape, value

from peftkit.monitor.drift import check_drift
from peftkit.monitor.reeval import reevaluate
from peftkit.registry import Registry
from peftkit.registry.gate import Gate
from peftkit.registry.traffic import count_samples
from peftkit.registry.watch import Watch, set_watch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread_per_training_child")]
WINDOW = 40
ISO_DATE = r"\d{4}-\d{2}-\d{2}"


def prompts(task: str, start: int, n: int) -> list[str]:
    """Users' questions: the task's training examples (the gate scores its test split)."""
    from peftkit.data.source import load_data

    examples = load_data(f"task:{task}", split="train", n=start + n)[start:]
    return [e.prompt[-1].content for e in examples]


def send(url: str, questions: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)

    def ask(question: str) -> str:
        r = client.chat.completions.create(
            model="dates", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # concurrent, so the engine batches them
        return list(pool.map(ask, questions))


def test_drift_is_caught_on_another_tasks_traffic_and_a_worse_version_by_reevaluation(
    tmp_path, dates_adapter
) -> None:
    from peftkit import AdaptedModel, LoraConfig
    from peftkit.base import load_base
    from peftkit.serve.commands import ServeConfig, prepare
    from peftkit.serve.engine import EngineConfig

    reg = Registry.open(tmp_path / "registry")
    v1 = reg.register("dates", dates_adapter)  # conftest: 24 steps, trained once per test run
    reg.set_gate("dates", Gate("task:dates", n=16))
    set_watch(reg.db, "dates", Watch(valid_regex=ISO_DATE, window=WINDOW))
    reg.promote(v1.ref, "production", force=True, reason="the first version")

    serve = ServeConfig(capture=1.0, max_tokens=32)
    prepared = prepare(
        "smollm2-135m", None, str(tmp_path / "registry"), serve, EngineConfig(max_len=512, max_batch=8)
    )
    with served_app(prepared.app) as url:
        answers = send(url, prompts("dates", 0, 2 * WINDOW))
        assert sum(a.strip().count("-") == 2 for a in answers) > WINDOW  # it answers with dates
        assert wait_for(lambda: count_samples(reg.db).get("dates") == 2 * WINDOW)
        calm = check_drift(reg, "dates")  # the second dates window, against the gate's eval set
        assert not calm["alert"], [s for s in calm["signals"] if s["alert"]]
        assert calm["reference"]["what"].startswith("the gate eval set task:dates")
        send(url, prompts("extract", 0, WINDOW))
        assert wait_for(lambda: count_samples(reg.db).get("dates") == 3 * WINDOW)
        before = scrape(url)
        shifted = check_drift(reg, "dates")
        fired = {s["signal"] for s in shifted["signals"] if s["alert"]}
        assert shifted["alert"] and {"prompt_length", "representation"} <= fired, fired
        signal = "representation"
        after = wait_for(lambda: (m := scrape(url)) and value(m, "peftkit_drift_alert", adapter="dates",
                                                               signal=signal) == 1 and m)  # fmt: skip
        assert value(before, "peftkit_drift_alert", adapter="dates", signal=signal) == 0 and after
        for name, result in (("calm", calm), ("shifted", shifted)):
            print(f"drift, {name}:", json.dumps({s["signal"]: [round(s["statistic"], 4), round(s["threshold"], 4)]
                                                 for s in result["signals"]}))  # fmt: skip

    good = reevaluate(reg, "dates")
    assert not good["alert"] and good["reference"] is None  # forced in: nothing to compare with yet
    model, _ = load_base("smollm2-135m", dtype="float32")
    worse = AdaptedModel.attach(model, LoraConfig(r=4, lora_alpha=64, init_lora_weights=False))
    v2 = reg.register("dates", worse.save_adapter(tmp_path / "worse"), description="deliberately worse")
    reg.promote(v2.ref, "production", force=True, reason="a bad push")
    bad = reevaluate(reg, "dates")
    print(f"re-evaluation: v1 {good['score']:.3f}, v2 {bad['score']:.3f}")
    assert bad["alert"] and bad["score"] < good["score"] - 0.05
    assert bad["reference"]["what"] == "the re-evaluation of dates@1"
    history = [e.action for e in reg.history("dates")]
    assert history.count("promote") == 2 and "gate" in history and "watch" in history  # all of it audited
