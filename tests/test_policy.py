"""Gated promotion as policy above the registry: `peftkit.policy.promote` runs the gate and hands its
result to `Registry.promote`, which checks the result against the gate as set and records it; the
registry itself runs nothing (tests/test_layering.py checks it imports no evaluation code)."""

from __future__ import annotations

import pytest
from test_registry_cli import adapter_for, registry_env  # noqa: F401 (a fixture)

from peftkit.errors import RegistryError
from peftkit.policy import promote
from peftkit.registry import Registry
from peftkit.registry.gate import Gate


def test_the_registry_checks_a_gate_result_against_the_gate_and_the_policy_runs_it(
    tiny_model_dir,
    tmp_path,
    registry_env,  # noqa: F811
) -> None:
    reg = Registry.open(registry_env)
    for seed in (1, 2, 3):
        reg.register("bot", adapter_for(tiny_model_dir, tmp_path / f"a{seed}", seed))
    reg.set_gate("bot", Gate("task:dates", n=2, base=str(tiny_model_dir), min_score=0.0, max_perplexity=1e9))
    honest = promote(reg, "bot@1", "production")  # the gate runs above the registry
    assert honest.stage == "production"
    result = reg.history("bot")[-1].details["gate"]
    assert result["passed"] and set(result["scores"]) == {"base", "candidate"}  # no production yet
    assert result["data"] == "task:dates" and result["production"] is None
    assert set(result["checks"]) == {"changes_the_base_model", "exact_match >= 0", "perplexity <= 1e+09"}

    # A result that does not follow from its scores under the gate as set is refused, whatever it says.
    reg.set_gate("bot", Gate("task:dates", n=2, base=str(tiny_model_dir), min_score=0.99))
    forged = {**result, "production": 1, "checks": {"changes_the_base_model": True}, "passed": True}
    low = {"score": 0.0, "perplexity": 9.0}
    forged["scores"] = {**result["scores"], "candidate": low, "production": low}
    with pytest.raises(RegistryError, match="not a pass of its gate as set now"):
        reg.promote("bot@2", "production", gate_result=forged)
    with pytest.raises(RegistryError, match="malformed"):
        reg.promote("bot@2", "production", gate_result={"passed": True})
    honest_but_elsewhere = {**result, "production": 1, "data": "task:extract"}
    with pytest.raises(RegistryError, match="is for eval set 'task:extract', the gate's is 'task:dates'"):
        reg.promote("bot@2", "production", gate_result=honest_but_elsewhere)
    with pytest.raises(RegistryError, match="names production version 1 but scores none"):
        reg.promote("bot@2", "production", gate_result={**result, "production": 1})
    assert [v.stage for v in reg.versions("bot")] == ["production", "draft", "draft"]  # nothing moved

    # The old call still runs the gate, once more, and says where it went.
    reg.set_gate("bot", Gate("task:dates", n=2, base=str(tiny_model_dir), max_perplexity=1e9, margin=1.0))
    with pytest.warns(DeprecationWarning, match=r"peftkit\.policy\.promote"):
        moved = reg.promote("bot@3", "production")
    assert moved.stage == "production" and reg.history("bot")[-1].details["gate"]["production"] == 1
    assert [v.stage for v in reg.versions("bot")] == ["archived", "draft", "production"]
