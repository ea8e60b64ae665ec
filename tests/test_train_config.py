"""Training configs: YAML plus overrides, every key checked by name, shipped examples parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.errors import ConfigError
from peftkit.train.config import TrainConfig, field_help, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides_merge_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: task:sentiment\nlr: 0.001\nlora:\n  r: 4\n  target_modules: [q_proj, v_proj]\n")
    c = load_config(path, {"lora.use_dora": True, "max_steps": 50})
    assert (c.data, c.lr, c.max_steps) == ("task:sentiment", 0.001, 50)
    assert c.lora.r == 4 and c.lora.use_dora and c.lora.target_modules == ("q_proj", "v_proj")
    assert c.lora.lora_alpha == TrainConfig().lora.lora_alpha  # untouched nested keys keep their defaults
    assert c.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"learnin_rate": 1}, "'learnin_rate'"),
        ({"lora.rank": 4}, "unknown LoRA config key 'rank' (did you mean 'r'?); valid keys: alpha_pattern"),
        ({"lr": "fast"}, "lr: 'fast'"),
        ({"precision": "fp16"}, "precision: 'fp16'; expected one of 'auto', 'bf16', 'fp32'"),
        ({"batch_size": 0}, "batch_size: 0"),
        ({"max_steps": 2.5}, "max_steps: 2.5"),
        ({"lora.r": 0}, "r: 0"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing: 'yes'"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_values_are_named(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, values)
    assert fragment in str(err.value)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_every_key_has_help_and_a_command_line_option() -> None:
    from peftkit.cli import build_parser

    helps = field_help()
    assert all(text for text in helps.values())
    usage = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for key in helps:
        assert f"--{key}" in usage, key


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_config_parses(path: Path) -> None:
    """A training config, or an experiment file (compare, tune): every run it describes is valid."""
    import yaml

    from peftkit.experiment import read_experiment
    from peftkit.experiment.config import SECTIONS

    if set(SECTIONS) & yaml.safe_load(path.read_text()).keys():
        experiment = read_experiment(path)  # builds (and so checks) the shared config and each variant
        assert experiment.variants or experiment.search is not None
        return
    config = load_config(path)
    assert config.to_dict() == load_config(None, config.to_dict()).to_dict()  # round trip
