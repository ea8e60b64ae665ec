"""The compute dtype is chosen by the device's capability in one place (peftkit.base.precision):
`auto` is bf16 only where it is native, float32 elsewhere, for every command that loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_base import tiny_model, write_hf_dir

from peftkit.base import precision
from peftkit.base.precision import auto_dtype, compute_dtype, flags_have_bf16, resolve_precision, why


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_warned", set())


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    avx2 = {"fpu", "sse4_2", "avx", "avx2", "fma"}
    assert not flags_have_bf16(avx2)
    assert flags_have_bf16(avx2 | {"avx512f", "avx512_bf16"})
    assert flags_have_bf16(avx2 | {"amx_tile", "amx_bf16"})
    assert not flags_have_bf16(avx2 | {"avx512f", "avx512bw"})  # AVX-512 without its bf16 extension


@pytest.mark.parametrize(("native", "expected"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_auto_follows_the_capability(monkeypatch, native, expected) -> None:
    monkeypatch.setenv("PEFTKIT_NATIVE_BF16", native)
    assert auto_dtype("cpu") == expected
    assert compute_dtype("auto", "cpu") == compute_dtype(None, "cpu") == expected
    assert resolve_precision("auto", "cpu") == ("bf16" if native == "1" else "fp32")
    assert why(expected, "cpu").startswith("bf16" if native == "1" else "fp32")


def test_the_reason_names_the_cpu_when_nothing_overrides_it(monkeypatch) -> None:
    monkeypatch.delenv("PEFTKIT_NATIVE_BF16")
    chosen = auto_dtype("cpu")
    has = flags_have_bf16(precision.cpu_flags())
    assert (chosen == torch.bfloat16) == has
    assert why(chosen, "cpu") == ("bf16: this CPU has native bf16" if has else
                                  "fp32: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)")  # fmt: skip


def test_an_explicit_bf16_without_native_support_is_honoured_with_one_warning_line(
    monkeypatch, capsys, fresh_warnings
) -> None:
    monkeypatch.setenv("PEFTKIT_NATIVE_BF16", "0")
    assert compute_dtype("bfloat16", "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "no native bfloat16" in err and "slower than" in err and "--dtype float32" in err
    assert compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert capsys.readouterr().err == ""  # once per process
    assert resolve_precision("bf16", "cpu") == "bf16"  # training's precision: honoured too


def test_a_command_that_sets_the_dtype_by_a_key_names_that_key(
    monkeypatch, capsys, fresh_warnings, tiny_model_dir
) -> None:
    """compare (evaluate.dtype) and tune (precision) load through load_base with their own advice."""
    from peftkit.base import load_base
    from peftkit.base.precision import PRECISION_ADVICE
    from peftkit.experiment.evaluation import DTYPE_ADVICE

    monkeypatch.setenv("PEFTKIT_NATIVE_BF16", "0")
    model, _ = load_base(str(tiny_model_dir), dtype="bfloat16", dtype_advice=DTYPE_ADVICE)
    assert model.dtype == torch.bfloat16
    err = capsys.readouterr().err
    assert "set evaluate: {dtype: auto} (or float32)" in err and "--dtype" not in err
    precision._warned.clear()  # said once per process: again, for the second command
    load_base(str(tiny_model_dir), dtype=torch.bfloat16, dtype_advice=PRECISION_ADVICE)
    assert "set precision: fp32 (or auto)" in capsys.readouterr().err


def test_no_warning_where_bf16_is_native(monkeypatch, capsys, fresh_warnings) -> None:
    monkeypatch.setenv("PEFTKIT_NATIVE_BF16", "1")
    assert compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype("float32", "cpu") == torch.float32
    assert capsys.readouterr().err == ""


def test_eval_generate_and_chat_load_a_bf16_checkpoint_in_float32_without_native_bf16(tmp_path) -> None:
    """eval, generate and chat open their model through one function; `--dtype auto` there."""
    from peftkit.eval.loading import load_model

    path = write_hf_dir(tmp_path / "bf16", tiny_model(), dtype=torch.bfloat16)
    model, _ = load_model(str(path), [], "auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_merge_auto_merges_in_float32_and_saves_in_the_checkpoints_dtype(tmp_path, monkeypatch) -> None:
    from peftkit import AdaptedModel, LoraConfig
    from peftkit.tools.merge import merge_to_dir

    path = write_hf_dir(tmp_path / "bf16", tiny_model(), dtype=torch.bfloat16)
    am = AdaptedModel.attach(
        tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    am.save_adapter(tmp_path / "adapter")
    seen: list[torch.dtype] = []
    real = AdaptedModel.merge_and_unload
    monkeypatch.setattr(  # the dtype the merge itself ran in
        AdaptedModel, "merge_and_unload", lambda self: seen.append(self.model.dtype) or real(self)
    )
    out = merge_to_dir(
        str(path), tmp_path / "adapter", tmp_path / "merged", check_base=False, log=lambda m: None
    )
    assert seen == [torch.float32]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (not a dict)


def test_the_training_header_says_why_the_dtype_was_chosen(tiny_model_dir: Path, tmp_path, capsys) -> None:
    from peftkit.train import TrainConfig, train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    config = TrainConfig(base=str(tiny_model_dir), data=str(data), max_steps=1, batch_size=4, progress=False,
                         tensorboard=False, output_dir=str(tmp_path / "run"))  # fmt: skip
    train(config)
    err = capsys.readouterr().err
    header = next(line for line in err.splitlines() if line.startswith("peftkit train:"))
    assert header.endswith("(lora, fp32: $PEFTKIT_NATIVE_BF16 says no native bf16)"), err
