"""Every method trains from the same YAML by changing `method:`: its shipped example config runs a few
steps on a tiny saved Llama through `peftkit train`, and the adapter it saves loads, changes the
model's outputs, generates, and describes itself in `peftkit info`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import make_data

from peftkit import METHODS, AdaptedModel
from peftkit.base import load_base
from peftkit.cli import main
from peftkit.identity import AdapterIdentity
from peftkit.tools.info import adapter_info
from peftkit.train import distributed
from peftkit.train.config import load_config
from peftkit.train.loop import train
from peftkit.train.setup import prepare

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {name: ROOT / "examples" / f"dates_{name}.yaml" for name in METHODS}


def tiny_run(example: Path, model_dir: Path, data: Path, out: Path, **overrides):
    """The example's config on the tiny model and data, for a few steps."""
    values = {
        "base": str(model_dir),
        "data": str(data),
        "output_dir": str(out),
        "max_steps": 3,
        "batch_size": 4,
        "eval_every": 3,
        "precision": "fp32",
        "progress": False,
        "tensorboard": False,
        "val_fraction": 0.25,
        **overrides,
    }
    return load_config(example, values)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_methods_example_trains_saves_loads_and_generates(method, tiny_model_dir, tmp_path) -> None:
    example = EXAMPLES[method]
    assert example.is_file(), f"every method ships an example config: {example.name}"
    assert load_config(example).method == method
    data = make_data(tmp_path / "up.jsonl", n=16)
    config = tiny_run(example, tiny_model_dir, data, tmp_path / "run")
    start = prepare(config, distributed.Dist())  # the run's own start: same seed, same adapter
    initial = {k: v.detach().clone() for k, v in start.net.adapter_state_dict("default").items()}
    result = train(config)
    assert result.steps == 3 and result.adapter_dir is not None
    trained = _tensors(result.adapter_dir)
    assert trained.keys() == initial.keys()
    assert any(not torch.allclose(trained[k].float(), initial[k].float()) for k in trained), (
        "training moved it"
    )
    files = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert files["peft_type"] == METHODS[method].peft_type

    model, tok = load_base(str(tiny_model_dir), dtype=torch.float32)
    ids = tok(["up abc", "up hg"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**ids).logits
    am = AdaptedModel.from_pretrained(model, result.adapter_dir)
    with torch.no_grad():
        adapted = am(**ids).logits
    assert adapted.shape == base.shape
    assert not torch.allclose(adapted, base, atol=1e-6), "the trained adapter must change the outputs"
    out = am.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids["input_ids"].shape[1] + 3)

    identity = AdapterIdentity.from_metadata(_metadata(result.adapter_dir))
    assert identity.method == method and identity.training["step"] == "3"
    facts = adapter_info(result.adapter_dir)
    assert facts["method_name"] == method and facts["parameters"] > 0
    assert main(["info", str(result.adapter_dir)]) == 0
    args = ["--base", str(tiny_model_dir), "--adapter", str(result.adapter_dir), "--max-new-tokens", "2"]
    assert main(["generate", *args, "--prompt", "up abc"]) == 0


def test_full_fine_tuning_is_the_same_config_with_method_full(tiny_model_dir, tmp_path) -> None:
    data = make_data(tmp_path / "up.jsonl", n=16)
    result = train(tiny_run(EXAMPLES["lora"], tiny_model_dir, data, tmp_path / "run", method="full"))
    assert result.adapter_dir is None and (result.model_dir / "config.json").is_file()


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _metadata(adapter_dir: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return dict(f.metadata())
