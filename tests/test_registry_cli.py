"""`peftkit registry ...` end to end on a tiny saved model, and registry references (NAME@N) wherever a
command takes an adapter directory: info, generate, eval, merge."""

from __future__ import annotations

import json
from pathlib import Path

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


def other_base(tiny_model_dir: Path, out: Path, tokenizer: bool = False) -> None:
    """Save the tiny model with other weights (the same architecture: another base) to `out`, with the
    tiny model's tokenizer if asked."""
    other, _ = load_base(str(tiny_model_dir), dtype=torch.float32, tokenizer="optional")
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    other.save_pretrained(out)
    if tokenizer:
        load_base(str(tiny_model_dir))[1].save_pretrained(out)


def test_another_base_is_refused_with_both_fingerprints_and_an_override_is_audited(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    other_base(tiny_model_dir, tmp_path / "other")
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
        ["bash", "examples/ci_cd_flow.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900
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


def run_json(capsys, *args: str) -> object:
    """Run `peftkit registry ARGS --json`, which must succeed, and return its output parsed."""
    capsys.readouterr()
    assert main(["registry", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def stored_file(root, sha: str):
    return root / "files" / "sha256" / sha[:2] / sha


def file_digests(directory: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


def test_every_stage_change_prints_the_version_as_json(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    for seed in (11, 12):
        adapter = adapter_for(tiny_model_dir, tmp_path / f"a{seed}", seed)
        [registered] = run_json(capsys, "register", "bot", str(adapter), "--tag", "x", "--description", "d")
        assert (registered["version"], registered["stage"], registered["tags"]) == (seed - 10, "draft", ["x"])
    found = run_json(capsys, "path", "bot@2")  # a directory of the version's files, for other tools
    assert found["ref"] == "bot@2" and Path(found["path"]).is_dir()
    assert file_digests(Path(found["path"])) == file_digests(tmp_path / "a12")
    assert main(["registry", "path", "bot@2"]) == 0 and capsys.readouterr().out.strip() == found["path"]
    staged = run_json(capsys, "promote", "bot@1", "--to", "staging")
    assert (staged["name"], staged["version"], staged["stage"]) == ("bot", 1, "staging")
    assert "gate" not in staged  # no gate ran
    assert run_json(capsys, "promote", "bot@1", "--to", "production", "--force")["stage"] == "production"
    second = run_json(capsys, "promote", "bot@2", "--to", "production", "--force")
    assert (second["version"], second["stage"], "gate" in second) == (2, "production", False)
    back = run_json(capsys, "rollback", "bot", "--reason", "bad")
    assert (back["version"], back["stage"]) == (1, "production")
    demoted = run_json(capsys, "demote", "bot@1", "--to", "staging")
    assert (demoted["version"], demoted["stage"]) == (1, "staging")
    v1, v2 = run_json(capsys, "list", "bot")
    assert (v1["stage"], v2["stage"]) == ("staging", "archived")
    deleted = run_json(capsys, "delete", "bot@2")
    assert (deleted["version"], deleted["digest"]) == (2, v2["digest"])
    assert [v["version"] for v in run_json(capsys, "list")] == [1]
    only_v2 = set(v2["files"].values()) - set(v1["files"].values())  # the config file is the same in both
    assert only_v2 and run_json(capsys, "gc", "--grace", "3600") == {"removed": []}  # too young to go
    assert all(stored_file(registry_env, sha).is_file() for sha in only_v2)
    removed = run_json(capsys, "gc", "--grace", "0")["removed"]
    assert sorted(removed) == sorted(only_v2)
    assert not any(stored_file(registry_env, sha).exists() for sha in only_v2)
    assert run_json(capsys, "gc", "--grace", "0") == {"removed": []}
    capsys.readouterr()
    assert main(["registry", "history", "bot", "--json"]) == 0
    actions = [(e["action"], e["version"]) for e in map(json.loads, capsys.readouterr().out.splitlines())]
    assert actions[-4:] == [("promote", 2), ("rollback", 1), ("demote", 1), ("delete", 2)]


def test_gate_export_import_and_check_print_json(tiny_model_dir, tmp_path, registry_env, capsys) -> None:
    adapter = adapter_for(tiny_model_dir, tmp_path / "a", seed=13)
    [version] = run_json(capsys, "register", "bot", str(adapter))
    data = make_data(tmp_path / "up.jsonl", n=4)
    gate = run_json(capsys, "gate", "bot", str(data), "--n", "3", "--min-score", "0.5", "--margin", "0.25")
    assert (gate["n"], gate["min_score"], gate["margin"], gate["metric"]) == (3, 0.5, 0.25, "auto")
    assert gate["data"] != str(data) and gate["data"].endswith("/up.jsonl")  # the registry's own copy
    bundle = tmp_path / "bot-1.tar"
    exported = run_json(capsys, "export", "bot@1", str(bundle))
    assert exported["bundle"] == str(bundle) and bundle.is_file()
    assert (exported["version"]["version"], exported["version"]["digest"]) == (1, version["digest"])
    other = tmp_path / "other-reg"
    [imported] = run_json(capsys, "import", str(bundle), "--registry", str(other))
    assert (imported["name"], imported["version"], imported["digest"]) == ("bot", 1, version["digest"])
    assert imported["stage"] == "draft"
    assert run_json(capsys, "check") == {"sound": True, "versions": 1, "problems": []}
    blob = stored_file(registry_env, version["files"]["adapter_model.safetensors"])
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    capsys.readouterr()
    assert main(["registry", "check", "--json"]) == 1  # still a failing exit code for scripts
    report = json.loads(capsys.readouterr().out)
    assert (report["sound"], report["versions"]) == (False, 1)
    assert len(report["problems"]) == 1 and "bot@1" in report["problems"][0]
    assert run_json(capsys, "check", "--registry", str(other))["sound"] is True  # the copy is intact


def test_every_registry_command_takes_json() -> None:
    import inspect

    from peftkit.cli import GROUPS, build_parser

    build_parser()  # imports the command modules
    commands = GROUPS["registry"][1]
    assert set(commands) == {"list", "show", "register", "promote", "demote", "rollback", "delete",
                             "gate", "history", "export", "import", "check", "gc", "path"}  # fmt: skip
    assert [c for c, fn in commands.items() if "json" not in inspect.signature(fn).parameters] == []


@pytest.mark.parametrize(
    "command",
    [
        ["list"], ["show", "bot"], ["history"], ["check"], ["export", "bot@1", "OUT"],
        ["promote", "bot@1"], ["demote", "bot@1"], ["rollback", "bot"], ["delete", "bot@1"], ["gc"],
    ],
)  # fmt: skip
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_command_on_a_missing_registry_creates_nothing(tmp_path, capsys, command, json_flag) -> None:
    """Reading (and changing versions, which needs some) never creates a registry: a mistyped
    --registry is one clear error, and nothing appears on disk."""
    missing = tmp_path / "no" / "reg"
    args = [str(tmp_path / "out.tar") if a == "OUT" else a for a in command]
    assert main(["registry", *args, "--registry", str(missing), *json_flag]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: there is no registry at {missing} (register an adapter to create one)\n"
    assert list(tmp_path.iterdir()) == []  # no registry, no parent directory, no bundle


def test_a_registry_path_that_is_a_file_is_refused_and_left_alone(tiny_model_dir, tmp_path, capsys) -> None:
    adapter = adapter_for(tiny_model_dir, tmp_path / "a", seed=14)
    path = tmp_path / "reg.txt"
    path.write_text("notes\n")
    capsys.readouterr()
    assert main(["registry", "register", "bot", str(adapter), "--registry", str(path), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: registry path ") and f"{path} is a file" in err
    assert main(["registry", "list", "--registry", str(path)]) == 2  # reading: there is no registry there
    assert "error: there is no registry at" in capsys.readouterr().err
    assert path.read_text() == "notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "reg.txt"]


def test_the_gate_refuses_a_candidate_below_production_unless_the_margin_allows_it(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    """The gate's production check, with a real score gap: the eval file's answers are the production
    version's own greedy answers, so production scores 1 and another adapter less."""
    from peftkit.eval.metrics import exact_match

    for seed in (21, 22):
        adapter = adapter_for(tiny_model_dir, tmp_path / f"a{seed}", seed)
        assert main(["registry", "register", "bot", str(adapter)]) == 0
    prompts = make_data(tmp_path / "up.jsonl", n=4)
    report = tmp_path / "eval.json"
    # The gate's own rows: base, candidate and production in one mixed batch, 32 new tokens (as set below).
    models = ["--base", str(tiny_model_dir), "--adapters", "candidate=bot@2", "production=bot@1"]
    assert main(["eval", str(prompts), *models, "--max-new-tokens", "32", "--json", str(report)]) == 0
    answers = {r["adapter"]: r["predictions"] for r in json.loads(report.read_text())["results"]}
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    data = tmp_path / "production-answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": a}) + "\n"
                            for r, a in zip(rows, answers["production"], strict=True)))  # fmt: skip
    expected = sum(map(exact_match, answers["candidate"], answers["production"])) / len(rows)
    assert expected < 1  # the two adapters answer differently: a gap the gate can see
    assert main(["registry", "promote", "bot@1", "--to", "production", "--force"]) == 0
    gate = ["registry", "gate", "bot", str(data), "--n", "4", "--base", str(tiny_model_dir),
            "--max-new-tokens", "32", "--margin"]  # fmt: skip
    assert main([*gate, "0"]) == 0
    capsys.readouterr()
    assert main(["registry", "promote", "bot@2", "--to", "production"]) == 2
    err = capsys.readouterr().err  # the only failed check is the production one
    assert "bot@2 failed its evaluation gate (exact_match >= production's 1 - margin 0);" in err
    assert [v["stage"] for v in run_json(capsys, "list", "bot")] == ["production", "draft"]  # unchanged
    margin = 1 - expected  # exactly the gap (quarters are exact in binary)
    assert main([*gate, f"{margin - 0.25:g}"]) == 0  # a quarter short of it: still refused
    assert main(["registry", "promote", "bot@2", "--to", "production"]) == 2
    assert f"production's 1 - margin {margin - 0.25:g});" in capsys.readouterr().err
    assert main([*gate, f"{margin:g}"]) == 0
    promoted = run_json(capsys, "promote", "bot@2", "--to", "production")
    assert (promoted["version"], promoted["stage"]) == (2, "production")
    result = promoted["gate"]
    assert result["scores"]["production"]["score"] == 1.0
    assert result["scores"]["candidate"]["score"] == expected
    assert result["checks"] == {
        "changes_the_base_model": True,
        f"exact_match >= production's 1 - margin {margin:g}": True,
    }
    assert (
        result["passed"] and result["production"] == 1 and (result["n"], result["max_new_tokens"]) == (4, 32)
    )
    assert [v["stage"] for v in run_json(capsys, "list", "bot")] == ["archived", "production"]


def test_the_gate_scores_a_candidate_of_another_method_than_production(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    """LoRA and IA³ both wrap v_proj, so they cannot share one model: the gate scores the candidate in
    a pass of its own on the same base instead of failing with advice for Python callers."""
    from peftkit import LoraConfig

    ia3 = adapter_for(tiny_model_dir, tmp_path / "ia3", seed=5)
    model, _ = load_base(str(tiny_model_dir), dtype=torch.float32, tokenizer="optional")
    lora = AdaptedModel.attach(model, LoraConfig(r=2, init_lora_weights=False)).save_adapter(
        tmp_path / "lora"
    )
    for adapter in (ia3, lora):
        assert main(["registry", "register", "bot", str(adapter)]) == 0
    assert main(["registry", "promote", "bot@1", "--to", "production", "--force"]) == 0
    assert main(["registry", "gate", "bot", "task:dates", "--n", "2", "--base", str(tiny_model_dir)]) == 0
    promoted = run_json(capsys, "promote", "bot@2", "--to", "production")
    assert promoted["stage"] == "production"
    assert set(promoted["gate"]["scores"]) == {"base", "candidate", "production"}


def test_a_gate_on_another_base_says_how_to_give_it_the_right_one(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    """Not "pass --no-check-base", which promote does not take: the gate's own --base is what to change."""
    other_base(tiny_model_dir, tmp_path / "other", tokenizer=True)
    assert (
        main(["registry", "register", "bot", str(adapter_for(tiny_model_dir, tmp_path / "a", seed=6))]) == 0
    )
    assert main(["registry", "gate", "bot", "task:dates", "--n", "2", "--base", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert main(["registry", "promote", "bot@1", "--to", "production"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"error: the gate of 'bot' runs on base model '{tmp_path / 'other'}'"), error
    assert "`peftkit registry gate bot DATA --base BASE`" in error and "no-check-base" not in error


def test_registering_identical_files_again_says_so(tiny_model_dir, tmp_path, registry_env, capsys) -> None:
    adapter = str(adapter_for(tiny_model_dir, tmp_path / "a", seed=7))
    capsys.readouterr()
    assert main(["registry", "register", "bot", adapter]) == 0
    assert capsys.readouterr().err == ""  # a new version: nothing to note
    assert main(["registry", "register", "bot", adapter, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == f"peftkit: {adapter} is identical to bot@1 (draft); no new version\n"
    assert json.loads(out)[0]["version"] == 1  # the JSON on stdout is the existing version, unchanged


def test_show_of_a_name_without_a_production_version_shows_the_latest_with_a_note(
    tiny_model_dir, tmp_path, registry_env, capsys
) -> None:
    for seed in (8, 9):
        assert (
            main(
                ["registry", "register", "bot", str(adapter_for(tiny_model_dir, tmp_path / f"a{seed}", seed))]
            )
            == 0
        )
    assert main(["registry", "promote", "bot@1"]) == 0  # staging; none in production
    capsys.readouterr()
    assert main(["registry", "show", "bot", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "peftkit: 'bot' has no production version; showing its latest, bot@2 (draft)\n"
    assert json.loads(out)["version"] == 2
    assert main(["registry", "show", "bot@production"]) == 2  # asked for by name: still an error
    assert "no production version; 'bot' has versions [1, 2]" in capsys.readouterr().err
    assert main(["registry", "promote", "bot@1", "--to", "production", "--force"]) == 0
    capsys.readouterr()
    assert main(["registry", "show", "bot"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "number            1" in out
