"""The Prometheus alerting rules shipped in deploy/prometheus, checked by the real `promtool` (Debian's
prometheus package; `make test` installs it): they parse, each one fires on the series its test file
gives and stays quiet before, every alert has such a test, and every metric they query is one the
server exports (the table in docs/serve.md, which test_serve_metrics holds to the real /metrics)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
TESTS = ROOT / "deploy" / "prometheus" / "alerts-test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: install Debian's prometheus package (`make test` does, as root)"
    return found


def test_the_rules_parse_and_each_alert_fires_as_its_test_says(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(TESTS)], capture_output=True, text=True, timeout=300
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for rule in rules:
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} is never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} is never tested quiet"


def test_the_rules_query_only_metrics_the_server_exports() -> None:
    doc = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8").split("### The metrics", 1)[1]
    exported = set(re.findall(r"^\| `(peftkit_[a-z_]+)`", doc, re.M))
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    queried = {m for r in rules for m in re.findall(r"\bpeftkit_[a-z_]+", r["expr"])}
    assert queried and queried <= exported, queried - exported


def test_every_command_line_of_docs_monitor_parses() -> None:
    """Each `peftkit ...` line of docs/monitor.md's bash blocks is a valid command line (the steps
    themselves run in test_monitor_builtin.py and test_monitor.py, through the same functions)."""
    import shlex

    from peftkit.cli import build_parser

    doc = (ROOT / "docs" / "monitor.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", doc, flags=re.DOTALL | re.MULTILINE)
    lines = [
        line.split(" #", 1)[0].split(" | ", 1)[0].strip()
        for b in blocks
        for line in b.replace("\\\n", " ").splitlines()
    ]
    commands = [shlex.split(line) for line in lines if line.startswith("peftkit ")]
    assert {c[1] for c in commands} >= {"train", "registry", "monitor", "serve"}
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv[1:])  # exits (fails the test) on an unknown command or option
