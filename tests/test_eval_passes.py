"""`peftkit eval` of adapters of different methods side by side (LoRA and IA³ both wrap k_proj, so they
cannot share one model: each is scored in a pass of its own, in one table), the one-line notes it
prints, and `generate`'s refusal of the same pair in words a command-line user can act on.

Real saved adapters of two methods on conftest's tiny Llama (`tiny_model_dir`), in-process `main`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit import AdaptedModel, IA3Config, LoraConfig
from peftkit.base import load_base
from peftkit.cli import main
from peftkit.data.example import Example
from peftkit.eval.run import evaluate


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


def saved(base: Path, path: Path, config: object) -> Path:
    """An adapter of `config`'s method with default targets and random (not no-op) weights, saved."""
    model, _ = load_base(str(base))
    am = AdaptedModel.attach(model, config)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return am.save_adapter(path)


@pytest.fixture
def lora_and_ia3(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(1)
    lora = saved(tiny_model_dir, tmp_path / "lora", LoraConfig(r=2))
    ia3 = saved(tiny_model_dir, tmp_path / "ia3", IA3Config())
    return lora, ia3


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"what is {i} + {i}?", "completion": str(2 * i)} for i in range(5)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def alone(base: Path, adapter: Path, examples: list[Example]) -> list[str]:
    """The adapter's answers when it is the only one on the base."""
    model, tokenizer = load_base(str(base))
    am = AdaptedModel.from_pretrained(model, adapter, "x")
    report = evaluate(am, tokenizer, examples, metric="exact_match", adapters=["x"], max_new_tokens=6)
    return report["x"].predictions


def test_eval_scores_a_lora_and_an_ia3_adapter_side_by_side_in_one_table(
    tiny_model_dir: Path, lora_and_ia3: tuple[Path, Path], data: Path, tmp_path: Path, capsys
) -> None:
    lora, ia3 = lora_and_ia3
    argv = ["eval", data, "--base", tiny_model_dir, "--adapters", lora, ia3, "--max-new-tokens", 6]
    code, out, err = run([*argv, "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    table = out.splitlines()
    assert [line.split()[0] for line in table[2:]] == ["base", "lora", "ia3"]
    assert "delete_adapter" not in err and "pass of its own" in err
    report = json.loads((tmp_path / "r.json").read_text())
    predictions = {r["adapter"]: r["predictions"] for r in report["results"]}
    examples = [Example.from_pair(f"what is {i} + {i}?", str(2 * i)) for i in range(5)]
    assert predictions["lora"] == alone(tiny_model_dir, lora, examples)
    assert predictions["ia3"] == alone(tiny_model_dir, ia3, examples)
    assert predictions["lora"] != predictions["ia3"]  # each row really ran through its own adapter


def test_an_adapter_that_fits_no_base_still_fails_before_anything_is_scored(
    tiny_model_dir: Path, lora_and_ia3: tuple[Path, Path], data: Path, tmp_path: Path, capsys
) -> None:
    lora, _ = lora_and_ia3
    broken = saved(tiny_model_dir, tmp_path / "broken", LoraConfig(r=2, target_modules=["q_proj"]))
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["nope_proj"]}))
    code, out, err = run(["eval", data, "--base", tiny_model_dir, "--adapters", lora, broken], capsys)
    assert code == 2 and out == "" and "evaluating" not in err
    assert err.splitlines()[-1].startswith("error: ") and "nope_proj" in err


def test_the_nf4_note_is_one_peftkit_line_not_a_python_warning(
    tiny_model_dir: Path, lora_and_ia3: tuple[Path, Path], data: Path, capsys
) -> None:
    lora, _ = lora_and_ia3
    argv = ["eval", data, "--base", tiny_model_dir, "--adapters", lora, "--n", 2, "--quantize", "nf4"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "full-precision form" in line]
    assert notes and all(line.startswith("peftkit: ") for line in notes), err
    assert "UserWarning" not in err and "checked = " not in err  # no source line under it


def test_generate_refuses_two_methods_on_one_module_without_python_advice(
    tiny_model_dir: Path, lora_and_ia3: tuple[Path, Path], capsys
) -> None:
    lora, ia3 = lora_and_ia3
    code, out, err = run(
        ["generate", "--base", tiny_model_dir, "--adapter", lora, ia3, "--prompt", "hi"], capsys
    )
    last = err.splitlines()[-1]
    assert code == 2 and out == "" and last.startswith("error: adapter 'ia3' cannot be active together")
    assert "delete_adapter" not in last and "peftkit eval --adapters" in last


def test_a_bare_4bit_base_is_scored_alone(tiny_model_dir: Path, data: Path, capsys) -> None:
    code, out, err = run(["eval", data, "--base", tiny_model_dir, "--n", 2, "--quantize", "nf4"], capsys)
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["base"]
