"""`peftkit registry ...` end to end on a tiny saved model, and registry references (NAME@N) wherever a
command takes an adapter directory: info, generate, eval, merge."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_data

from peftkit import AdaptedModel, IA3Config
from peftkit.base import load_base
from peftkit.cli import main


@pytest.fixture
def registry_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.setenv("PEFTKIT_USER", "ci")
    return tmp_path / "reg"


def adapter_for(model_dir, out, seed):
    model, _ = load_base(str(model_dir), dtype=torch.float32, tokenizer="optional")
    torch.manual_seed(seed)
    AdaptedModel.attach(
        model, IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[], init_ia3_weights=False)
    ).save_adapter(out)
    return out


def test_register_promote_rollback_history_and_check(tiny_model_dir, tmp_path, registry_env, capsys) -> None:
    for seed in (1, 2):
        assert (
            main(
                [
                    "registry",
                    "register",
                    "bot",
                    str(adapter_for(tiny_model_dir, tmp_path / f"a{seed}", seed)),
                    "--tag",
                    "t",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert main(["registry", "list", "bot", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["name"], v["version"], v["stage"], v["method"]) for v in listed] == [
        ("bot", 1, "draft", "ia3"),
        ("bot", 2, "draft", "ia3"),
    ]
    assert main(["registry", "promote", "bot@1", "--to", "production"]) == 2  # the gate is not built: --force
    assert "evaluation gate" in capsys.readouterr().err
    assert main(["registry", "promote", "bot@1", "--to", "production", "--force", "--reason", "v1"]) == 0
    assert main(["registry", "promote", "bot@2", "--to", "production", "--force"]) == 0
    assert main(["registry", "rollback", "bot"]) == 0
    capsys.readouterr()
    assert main(["registry", "show", "bot", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["name"], shown["version"], shown["stage"]) == ("bot", 1, "production")
    assert shown["base_fingerprint"].startswith("sha256:") and set(shown["files"]) >= {
        "adapter_model.safetensors"
    }
    assert main(["registry", "history", "bot", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["action"] for e in entries] == ["register", "register", "promote", "promote", "rollback"]
    assert all(e["who"] == "ci" and e["when"] for e in entries) and entries[-1]["version"] == 1
    assert main(["registry", "check"]) == 0
    blob = next((registry_env / "files" / "sha256").glob("*/*"))
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    assert main(["registry", "check"]) == 1
    assert "problem:" in capsys.readouterr().out


def test_a_registry_reference_works_wherever_a_directory_does(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    source = adapter_for(tiny_model_dir, tmp_path / "a", seed=3)
    assert main(["registry", "register", "bot", str(source)]) == 0
    capsys.readouterr()
    assert main(["info", "bot@1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method_name"] == "ia3"
    base = ["--base", str(tiny_model_dir)]
    assert main(["generate", *base, "--adapter", "bot@1", "--max-new-tokens", "2", "--prompt", "up abc"]) == 0
    data = make_data(tmp_path / "up.jsonl", n=4)
    report = tmp_path / "eval.json"
    assert main(["eval", str(data), *base, "--adapters", "bot@1", "--n", "2", "--json", str(report)]) == 0
    assert main(["merge", str(tiny_model_dir), "bot@1", str(tmp_path / "merged")]) == 0
    assert main(["info", "nobody@1"]) == 2
    assert "no adapter named 'nobody'" in capsys.readouterr().err


def no_op_adapter(model_dir, out):
    """An IA³ adapter at its initial value (every scale 1): it loads and changes nothing."""
    model, _ = load_base(str(model_dir), dtype=torch.float32, tokenizer="optional")
    AdaptedModel.attach(model, IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_adapter(out)
    return out


def test_promotion_to_production_runs_the_evaluation_gate(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    data = make_data(tmp_path / "up.jsonl", n=6)
    assert (
        main(["registry", "register", "bot", str(adapter_for(tiny_model_dir, tmp_path / "a", seed=4))]) == 0
    )
    assert main(["registry", "register", "bot", str(no_op_adapter(tiny_model_dir, tmp_path / "noop"))]) == 0
    assert main(["registry", "promote", "bot@1", "--to", "production"]) == 2  # no gate set: refused
    assert "no evaluation gate" in capsys.readouterr().err
    gate = ["registry", "gate", "bot", str(data), "--n", "4", "--base", str(tiny_model_dir)]
    assert main([*gate, "--min-score", "1.01"]) == 0  # unreachable: exact match is at most 1
    data.unlink()  # the registry keeps its own copy of the eval file
    assert main(["registry", "promote", "bot@1", "--to", "production"]) == 2
    assert "failed its evaluation gate (exact_match >= 1.01)" in capsys.readouterr().err
    assert main([*gate[:3], "task:dates", "--n", "2", "--base", str(tiny_model_dir)]) == 0
    assert main(["registry", "promote", "bot@2", "--to", "production"]) == 2  # a no-op adapter never passes
    assert "changes_the_base_model" in capsys.readouterr().err
    assert main(["registry", "promote", "bot@1", "--to", "production"]) == 0
    capsys.readouterr()
    assert main(["registry", "history", "bot", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["action"] for e in entries] == ["register", "register", "gate", "gate", "promote"]
    result = entries[-1]["details"]["gate"]
    assert result["passed"] and result["checks"]["changes_the_base_model"] and result["n"] == 2
    assert set(result["scores"]) == {"base", "candidate"}
    assert main(["registry", "list", "bot", "--json"]) == 0
    stages = [v["stage"] for v in json.loads(capsys.readouterr().out)]
    assert stages == ["production", "draft"]  # the refused promotions changed nothing


def test_train_register_files_the_adapter_with_its_training_facts(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    data = make_data(tmp_path / "up.jsonl", n=8)
    args = [
        "train",
        "--base",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    args += ["--max_steps", "2", "--batch_size", "4", "--precision", "fp32", "--progress", "false"]
    args += ["--tensorboard", "false", "--lora.r", "2", "--val_fraction", "0.25", "--eval_every", "2"]
    assert main([*args, "--register", "bad/name"]) == 2  # refused before the run
    assert not (tmp_path / "run").exists()
    assert main([*args, "--register", "up"]) == 0
    assert "registered up@1 (draft)" in capsys.readouterr().out
    assert main(["registry", "show", "up@1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "lora" and shown["dataset_hash"] and shown["facts"]["training"]["step"] == 2
    assert "training_config.yaml" in shown["files"]


def test_another_base_is_refused_with_both_fingerprints_and_an_override_is_audited(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    other, _ = load_base(str(tiny_model_dir), dtype=torch.float32, tokenizer="optional")
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)  # the same architecture, other weights: another base
    other.save_pretrained(tmp_path / "other")
    assert (
        main(["registry", "register", "bot", str(adapter_for(tiny_model_dir, tmp_path / "a", seed=5))]) == 0
    )
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "other"), "bot@1", str(tmp_path / "m1")]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and err.count("fingerprint") >= 2 and not (tmp_path / "m1").exists()
    assert main(["merge", str(tmp_path / "other"), "bot@1", str(tmp_path / "m2"), "--no-check-base"]) == 0
    capsys.readouterr()
    assert main(["registry", "history", "bot", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["action"] == "override" and last["version"] == 1
    assert last["details"]["base_fingerprint"] != last["details"]["recorded"]


def test_the_documented_ci_cd_flow_runs_end_to_end(tiny_model_dir, tmp_path, registry_env) -> None:
    """examples/ci_cd_flow.sh on the tiny model: train twice with --register, set a gate, promote
    through staging to production (gated), replace, roll back; then the registry says so."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = make_data(tmp_path / "up.jsonl", n=16)
    env = {**os.environ, "BASE": str(tiny_model_dir), "DATA": str(data), "STEPS": "2", "OUT": str(tmp_path / "out"),
           "PEFTKIT": f"{sys.executable} -m peftkit", "GATE_N": "4", "MIN_SCORE": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        ["bash", "examples/ci_cd_flow.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from peftkit.registry import Registry

    reg = Registry.open()
    assert reg.resolve_version("dates").number == 1  # rolled back to version 1
    actions = [(e.action, e.version) for e in reg.history("dates")]
    assert actions == [("register", 1), ("register", 2), ("gate", None), ("promote", 1), ("promote", 1),
                       ("promote", 2), ("rollback", 1)]  # fmt: skip
    gated = reg.history("dates")[4]
    assert gated.details["gate"]["passed"] and not gated.details["force"]
    assert reg.history("dates")[5].details["force"] is True
    assert "sound" in done.stdout


def test_every_command_takes_the_registry_as_an_option(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("PEFTKIT_REGISTRY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default registry would be here: must stay unused
    reg = ["--registry", str(tmp_path / "team-reg")]
    assert (
        main(["registry", "register", "bot", str(adapter_for(tiny_model_dir, tmp_path / "a", seed=6)), *reg])
        == 0
    )
    capsys.readouterr()
    assert main(["info", "bot@1", "--json", *reg]) == 0
    assert json.loads(capsys.readouterr().out)["method_name"] == "ia3"
    args = ["--base", str(tiny_model_dir), "--adapter", "bot@1", "--max-new-tokens", "2", "--prompt", "up"]
    assert main(["generate", *args, *reg]) == 0
    assert main(["info", "bot@1"]) == 2  # without it: the default registry, which does not exist
    assert "not found: bot@1" in capsys.readouterr().err
    assert not (tmp_path / "home" / ".peftkit").exists()  # and reading did not create one
