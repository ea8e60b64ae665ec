"""Config values as people write them: scientific notation, odd encodings, non-string keys, huge
numbers and nonsense values fail (or work) in the config layer, before any model loads, and the
CLI reports each as one `error:` line with exit code 2."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.methods.lora_config import LoraConfig
from peftkit.train.config import TrainConfig, load_config

BIG = "1" + "0" * 5000  # more digits than Python turns into an int from text (4300)


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """`peftkit train` with the training itself replaced: the configs it would have trained with."""
    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, **options: Any) -> SimpleNamespace:
        seen.append(config)
        return SimpleNamespace(adapter_dir="a", model_dir=None, steps=0, seconds=0.0, tokens_per_second=0.0)

    monkeypatch.setattr("peftkit.train.loop.train", fake_train)
    return seen


def run_train(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `peftkit train ARGV`."""
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- item 8: scientific notation -----------------------------------------------------------------
def test_scientific_notation_on_the_command_line(trained: list, capsys: pytest.CaptureFixture) -> None:
    argv = ["--lr", "5e-4", "--weight_decay", "1e-2", "--lora.lora_dropout", "5e-2"]
    argv += ["--warmup_ratio", "1e-1", "--max_grad_norm", "5E-1", "--lora.lora_alpha", "3.2e1"]
    code, err = run_train(capsys, *argv)
    assert code == 0, err
    c = trained[0]
    assert (c.lr, c.weight_decay, c.warmup_ratio, c.max_grad_norm) == (5e-4, 1e-2, 1e-1, 0.5)
    assert (c.lora.lora_dropout, c.lora.lora_alpha) == (5e-2, 32.0)


def test_scientific_notation_in_a_yaml_file(tmp_path: Path) -> None:
    # YAML 1.1 reads 5e-4 (no dot) as text; every float key takes what float() takes.
    path = tmp_path / "c.yaml"
    path.write_text(
        "lr: 5e-4\nlora_plus_ratio: 1.6e+1\nval_fraction: 1e-1\n"
        "lora:\n  lora_alpha: 1e1\n  lora_dropout: 5e-2\n  alpha_pattern: {q_proj: 2e0}\n"
    )
    c = load_config(path)
    assert (c.lr, c.lora_plus_ratio, c.val_fraction) == (5e-4, 16.0, 0.1)
    assert (c.lora.lora_alpha, c.lora.lora_dropout, c.lora.alpha_pattern) == (10.0, 0.05, {"q_proj": 2.0})
    assert load_config(None, c.to_dict()) == c  # the resolved config round-trips


def test_numeric_text_is_not_taken_for_ints_or_bools() -> None:
    # Only float keys read numbers from text: "1e3" steps or "1" for true would change meaning.
    for key, value in [("max_steps", "1e3"), ("batch_size", "8"), ("progress", "1"), ("lora.r", "8")]:
        with pytest.raises(ConfigError, match=key.split(".")[-1]):
            load_config(None, {key: value})


# -- item 19: the dataclass built directly, and values that make no sense ------------------------
def test_the_dataclass_built_directly_checks_like_load_config() -> None:
    assert TrainConfig(lr="5e-4").lr == 5e-4  # the same rule as a YAML file: numeric text is a float
    assert TrainConfig(lora={"r": 4}).lora == LoraConfig(r=4)
    with pytest.raises(ConfigError, match=r"invalid value for epochs: \[1\]; expected int"):
        TrainConfig(epochs=[1])
    with pytest.raises(ConfigError, match="invalid value for lr: 'fast'"):
        TrainConfig(lr="fast")
    assert LoraConfig(lora_alpha="16", lora_dropout="5e-2").lora_alpha == 16.0


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"lr": math.nan}, ["lr: nan", "finite number > 0"]),
        ({"lr": math.inf}, ["lr: inf", "finite"]),
        ({"lr": "nan"}, ["lr: nan"]),
        ({"lora_plus_ratio": math.inf}, ["lora_plus_ratio: inf"]),
        ({"weight_decay": math.nan}, ["weight_decay: nan", "finite number >= 0"]),
        ({"warmup_ratio": math.nan}, ["warmup_ratio: nan", "[0, 1)"]),
        ({"val_fraction": math.inf}, ["val_fraction: inf"]),
        ({"max_grad_norm": math.inf}, ["max_grad_norm: inf", "or null for no clipping"]),
        ({"lora": {"lora_alpha": math.nan}}, ["lora_alpha: nan"]),
        ({"lora": {"lora_dropout": "inf"}}, ["lora_dropout: inf"]),
        ({"max_examples": -1}, ["max_examples: -1", ">= 1, or null"]),
        ({"max_examples": 0}, ["max_examples: 0"]),
        ({"seed": -1}, ["seed: -1", "[0, 2**64)"]),
        ({"seed": 2**64}, ["seed:"]),
        ({"output_dir": ""}, ["output_dir: ''", "e.g. 'runs/{task}-{method}'"]),
        ({"output_dir": "  "}, ["output_dir"]),
        ({"output_dir": "r/{foo}"}, ["placeholder {foo}", "only plain {task} and {method}"]),
        ({"output_dir": "r/{task!r}"}, ["placeholder {task!r}"]),
        ({"output_dir": "r/{task:>300}"}, ["placeholder {task:>300}"]),
        ({"output_dir": "r/{}"}, ["placeholder {}"]),
        ({"output_dir": "r/{task"}, ["'r/{task'", "literal brace as {{"]),
        ({"output_dir": "r/task}"}, ["'r/task}'", "literal brace"]),
        ({"output_dir": "r/{task:d}"}, ["'r/{task:d}'", "placeholder {task:d}"]),
        ({"data": ""}, ["data: ''", "task:dates"]),
        ({"base": " "}, ["base: ' '"]),
        ({"system": "\ud800"}, ["system", "unpaired surrogate (U+D800"]),
        ({"lr": 10**400}, ["lr: an integer of about 401 digits", "finite"]),
        ({"lora": {"lora_alpha": 10**400}}, ["lora_alpha: an integer of about 401 digits"]),
    ],
)
def test_values_that_make_no_sense_are_refused_by_name(values: dict, fragments: list[str]) -> None:
    for make in (lambda: TrainConfig(**values), lambda: load_config(None, values)):
        with pytest.raises(ConfigError) as err:
            make()
        for fragment in fragments:
            assert fragment in str(err.value), (fragment, str(err.value))


def test_literal_braces_and_the_two_placeholders_are_fine() -> None:
    assert TrainConfig(output_dir="runs/{{x}}/{task}-{method}").output_dir == "runs/{{x}}/{task}-{method}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--seed", "-1"],
        ["--max_examples", "-1"],
        ["--output_dir", "r/{foo}"],
        ["--lr", "nan"],
        ["--lr", ".inf"],
        ["--max_steps", "1e3"],
    ],
)
def test_bad_values_stop_the_cli_before_training(
    argv: list[str], trained: list, capsys: pytest.CaptureFixture
) -> None:
    code, err = run_train(capsys, *argv)
    assert_one_error_line(code, err, argv[0].lstrip("-"))
    assert not trained


def test_a_blank_value_on_the_command_line_is_named_as_blank(
    trained: list, capsys: pytest.CaptureFixture
) -> None:
    code, err = run_train(capsys, "--output_dir", "")
    assert_one_error_line(code, err, "output_dir: ''")  # not "None" (YAML reads '' as null)
    assert not trained


# -- item 15: files and values that used to give tracebacks --------------------------------------
@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ("lr: 0.001\nsystem: caf\u00e9\n".encode("latin-1"), ["not UTF-8 text (byte 0xe9", "re-save it as UTF-8"]),
        ("lr: 0.001\n".encode("utf-16"), ["UTF-16", "re-save it as UTF-8"]),
        (b"1: 2\n", ["config key 1 (int) is not a field name", "valid keys: base"]),
        (b"lora:\n  1: 2\n", ["LoRA config key 1 (int)", "valid keys: alpha_pattern"]),
        (b"lora:\n  rank_pattern: {1: 4}\n", ["rank_pattern key 1 (int) must be a regex string"]),
        (b"lora:\n  rank_pattern: [q_proj]\n", ["rank_pattern", "a mapping"]),
        (b"lora:\n  layers_to_transform: 3.0\n", ["layers_to_transform: 3.0"]),
        (f"max_steps: {BIG}\n".encode(), ["line 1", "4300 digits", "quote it"]),
        (b"lr: !!float abc\n", ["line 1, column 5", "cannot read this value"]),
        (b"data: 2024-13-45\n", ["line 1", "month must be in 1..12"]),
        (b"lr: [" * 5000 + b"]" * 5000, ["too deeply"]),
        (b'system: "\\ud800"\n', ["system", "unpaired surrogate"]),
        (b"lr: 0.1\nlora:\n  r: 4\n  r: 8\n", ["line 4, column 3", "the key 'r' is given twice"]),
    ],
    ids=[
        "latin-1", "utf-16", "int-key", "nested-int-key", "pattern-int-key", "pattern-list",
        "float-layers", "5000-digits", "bad-float-tag", "bad-date", "deep", "surrogate", "twice",
    ],
)  # fmt: skip
def test_unreadable_config_files_are_one_error_line(
    data: bytes, fragments: list[str], tmp_path: Path, trained: list, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    code, err_text = run_train(capsys, str(path))
    assert_one_error_line(code, err_text, *fragments)
    assert not trained


def test_a_huge_number_in_an_override_is_named_briefly() -> None:
    # What the command line hands over once its YAML reader gives up on the number (see below).
    with pytest.raises(ConfigError) as err:
        load_config(None, {"max_steps": BIG})
    assert "invalid value for max_steps" in str(err.value) and "expected int" in str(err.value)
    assert len(str(err.value)) < 200
    with pytest.raises(ConfigError, match="a negative integer of about 5001 digits"):
        TrainConfig(max_steps=-(10**5000))


def test_a_5000_digit_integer_on_the_command_line(trained: list, capsys: pytest.CaptureFixture) -> None:
    code, err = run_train(capsys, "--max_steps", BIG)
    assert_one_error_line(code, err, "max_steps")


def test_yaml_alias_bombs_and_big_files_are_fine(tmp_path: Path) -> None:
    # Aliases share one object (PyYAML does not expand them); error messages print a bounded repr.
    levels = ["&a [" + ", ".join(["x"] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{name} [{', '.join([f'*{prev}'] * 9)}]")  # 9**9 leaves when expanded
    path = tmp_path / "bomb.yaml"
    path.write_text(f"lora:\n  target_modules: [{', '.join(levels)}]\n")
    with pytest.raises(ConfigError, match="target_modules") as err:
        load_config(path)
    assert len(str(err.value)) < 300
    big = tmp_path / "big.yaml"
    big.write_text("# a comment\n" * 20_000 + f"system: {'y' * 1_000_000}\nlr: 1e-3\n")
    config = load_config(big)
    assert config.lr == 1e-3 and len(config.system or "") == 1_000_000


def test_bad_lora_section_types_are_named() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"layers_pattern": 5}, "layers_pattern: 5"),
        ({"alpha_pattern": 5}, "alpha_pattern: 5"),
        ({"alpha_pattern": {"q": "x"}}, "alpha_pattern['q']: 'x'"),
        ({"rank_pattern": "x"}, "rank_pattern: 'x'"),
    ]
    for values, fragment in cases:
        with pytest.raises(ConfigError) as err:
            LoraConfig(**values)
        assert fragment in str(err.value)


# -- item 11: one target name on the command line ------------------------------------------------
def test_one_target_name_on_the_command_line_adapts_that_layer(
    trained: list, capsys: pytest.CaptureFixture
) -> None:
    from conftest import tiny_llama

    from peftkit import AdaptedModel
    from peftkit.methods import LoraLayer

    code, err = run_train(capsys, "--lora.target_modules", "q_proj")
    assert code == 0, err
    assert trained[0].lora.target_modules == "q_proj"  # YAML reads one name as a string, not a list
    am = AdaptedModel.attach(tiny_llama(), trained[0].lora)
    layers = {n for n, m in am.model.named_modules() if isinstance(m, LoraLayer)}
    assert layers == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
