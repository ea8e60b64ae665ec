"""Errors that point at the fix (issue 18, items 12 and 16): a well-known other name for a config key
gets its suggestion, `peftkit info` of a run directory names the adapter inside it, a missing
`--prompts` file names its option.

In-process `main` on conftest's tiny Llama where a command is run; configs through a real YAML file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit import IA3Config, LoraConfig
from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.methods.bottleneck_config import BottleneckConfig


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- config keys by another name -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "key", "meant"),
    [
        (LoraConfig, "rank", "r"),
        (LoraConfig, "alpha", "lora_alpha"),  # a spelling check would say alpha_pattern
        (LoraConfig, "dropout", "lora_dropout"),
        (LoraConfig, "targets", "target_modules"),
        (LoraConfig, "target", "target_modules"),
        (LoraConfig, "dora", "use_dora"),
        (IA3Config, "targets", "target_modules"),
        (IA3Config, "ff_modules", "feedforward_modules"),
        (BottleneckConfig, "dropout", "adapter_dropout"),
        (BottleneckConfig, "activation", "non_linearity"),
        (LoraConfig, "lora_alfa", "lora_alpha"),  # a misspelling still gets the closest key
    ],
)
def test_a_well_known_other_name_suggests_our_key(cls: type, key: str, meant: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls.from_dict({key: 1})
    assert f"config key {key!r} (did you mean {meant!r}?)" in str(info.value)


def test_lora_rank_in_a_train_config_suggests_r(tmp_path: Path, capsys) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"base: {tmp_path / 'no-model'}\ndata: task:dates\nlora: {{rank: 8}}\n")
    code, out, err = run(["train", config], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: lora: unknown LoRA config key 'rank' (did you mean 'r'?)"), err


# -- a training run's directory where an adapter goes ---------------------------------------------
@pytest.fixture
def run_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A training run's directory as `peftkit train` leaves it when no validation ran: adapter-last."""
    from peftkit import AdaptedModel
    from peftkit.base import load_base

    model, _ = load_base(str(tiny_model_dir))
    run = tmp_path / "run"
    AdaptedModel.attach(model, LoraConfig(r=2, target_modules=["q_proj"])).save_adapter(run / "adapter-last")
    (run / "summary.json").write_text("{}\n")
    return run


def test_info_of_a_run_directory_names_the_adapter_inside_it(run_dir: Path, capsys) -> None:
    code, out, err = run(["info", run_dir], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {run_dir} is a training run's directory, not an adapter: ")
    assert (
        f"give the adapter inside it, {run_dir / 'adapter-last'} (where the run ended; no validation" in err
    )
    (run_dir / "adapter-best").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run_dir / "adapter-best" / name).write_bytes((run_dir / "adapter-last" / name).read_bytes())
    code, out, err = run(["info", run_dir], capsys)
    assert code == 2 and f"{run_dir / 'adapter-best'} (the lowest validation loss" in err
    code, out, err = run(["info", run_dir / "adapter-best"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    "command", ["eval task:dates --adapters", "generate --prompt hi --adapter", "registry register x"]
)
def test_other_commands_name_the_adapter_inside_a_run_directory_too(
    command: str, run_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PEFTKIT_REGISTRY", str(tmp_path / "reg"))
    base = [] if command.startswith("registry") else ["--base", tiny_model_dir]
    code, out, err = run([*command.split(), run_dir, *base], capsys)
    assert code == 2 and f"give the adapter inside it, {run_dir / 'adapter-last'}" in err
    assert "loading base model" not in err


# -- a missing file names the option it came from ------------------------------------------------
def test_a_missing_prompts_file_names_the_option(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.txt"
    code, out, err = run(["generate", "--prompts", missing], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: --prompts {missing}: file not found"), err
