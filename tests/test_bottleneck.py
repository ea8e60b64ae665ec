"""Bottleneck adapters: the formula against a hand-written reference, the Houlsby and Pfeiffer
placements, mixed batches, the file format (format_version) and a few training steps.

HF PEFT has no bottleneck adapters, so the references here are written out by hand; the shared
contract matrix (tests/test_contract.py -k bottleneck) covers the rest of the adapter contract.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import model_input, output, tiny_gpt2, tiny_llama

from peftkit import AdaptedModel, AdapterFileError, AdapterStateError, ConfigError, TargetError
from peftkit.methods.bottleneck import BottleneckLayer
from peftkit.methods.bottleneck_config import BottleneckConfig
from peftkit.tools.info import adapter_info, format_info

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model."


def adapter_fn(am: AdaptedModel, name: str, module: str, act, scaling: float):
    """The adapter `name` on `module` as a plain function of the layer output y, from its saved tensors."""
    t = {k.removeprefix(f"{PREFIX}{module}."): v.detach() for k, v in am.adapter_state_dict(name).items()}
    wd, bd, wu, bu = (
        t[k] for k in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    )
    return lambda y: y + scaling * (act(y @ wd.T + bd) @ wu.T + bu)


def perturb(am: AdaptedModel, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_state_dict(name).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def wrapped(am: AdaptedModel) -> list[str]:
    return sorted(n for n, m in am.model.named_modules() if isinstance(m, BottleneckLayer))


# -- the formula --------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_init_leaves_the_model_unchanged(placement: str) -> None:
    model, x = tiny_llama(), model_input("llama")
    base = output(model, x)
    am = AdaptedModel.attach(model, BottleneckConfig(config=placement, bottleneck_size=4))
    assert torch.equal(output(am, x), base)  # the up-projection is zero: exactly y + 0


def test_layer_output_is_the_hand_written_formula_and_adapters_stack_in_order() -> None:
    am = AdaptedModel.attach(
        tiny_llama(),
        BottleneckConfig(
            config="houlsby", bottleneck_size=3, non_linearity="gelu", scaling=0.5, init_weights=False
        ),
        "a",
    )
    am.add_adapter(
        "b", BottleneckConfig(config="houlsby", bottleneck_size=2, non_linearity="tanh", init_weights=False)
    )
    module = "model.layers.0.self_attn.o_proj"
    layer = am.model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, 16)
    y = x @ layer.base_layer.weight.T  # (2, 5, 16): Llama's o_proj has no bias
    fa = adapter_fn(am, "a", module, F.gelu, 0.5)
    fb = adapter_fn(am, "b", module, torch.tanh, 1.0)
    torch.testing.assert_close(layer(x), fa(y))
    am.set_adapter(["a", "b"])  # in sequence: b reads a's output
    torch.testing.assert_close(layer(x), fb(fa(y)))
    am.set_adapter(["b", "a"])
    torch.testing.assert_close(layer(x), fa(fb(y)))
    assert not torch.allclose(fa(fb(y)), fb(fa(y)), atol=1e-4), "the order must matter"


def test_gpt2_conv1d_layers_take_adapters_on_their_output() -> None:
    model = tiny_gpt2()
    config = BottleneckConfig(
        target_modules=["attn.c_proj", "mlp.c_proj"], bottleneck_size=4, init_weights=False
    )
    am = AdaptedModel.attach(model, config)
    assert wrapped(am) == [f"transformer.h.{i}.{m}.c_proj" for i in (0, 1) for m in ("attn", "mlp")]
    layer = am.model.transformer.h[1].mlp.c_proj  # Conv1D: weight (in 64, out 16)
    x = torch.randn(2, 3, 64)
    y = x @ layer.base_layer.weight + layer.base_layer.bias  # (2, 3, 16)
    torch.testing.assert_close(
        layer(x), adapter_fn(am, "default", "transformer.h.1.mlp.c_proj", F.relu, 1.0)(y)
    )


def test_a_4bit_base_layer_takes_an_adapter() -> None:
    from peftkit.base.nf4 import NF4Linear

    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    mlp.down_proj = NF4Linear.from_linear(mlp.down_proj, compute_dtype=torch.float32)
    am = AdaptedModel.attach(model, BottleneckConfig(bottleneck_size=4, init_weights=False))
    layer = am.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, 32, requires_grad=True)
    y = layer.base_layer(x)  # the 4-bit layer's own output; its weight is never read directly
    ref = adapter_fn(am, "default", "model.layers.0.mlp.down_proj", F.relu, 1.0)(y)
    out = layer(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(p.grad is not None for p in layer.adapter_tensors("default").values())


def test_adapter_dtype_follows_the_base_unless_given() -> None:
    model = tiny_llama().to(torch.bfloat16)
    am = AdaptedModel.attach(model, BottleneckConfig(bottleneck_size=4, init_weights=False), "bf16")
    am.add_adapter("fp32", BottleneckConfig(bottleneck_size=4, init_weights=False), dtype=torch.float32)
    layer = am.model.model.layers[0].mlp.down_proj
    assert {p.dtype for p in layer.adapter_tensors("bf16").values()} == {torch.bfloat16}
    assert {p.dtype for p in layer.adapter_tensors("fp32").values()} == {torch.float32}
    am.set_adapter("fp32")
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    y = layer.base_layer(x)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = adapter_fn(am, "fp32", "model.layers.0.mlp.down_proj", F.relu, 1.0)(y.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_dropout_acts_on_the_adapter_input_only() -> None:
    model = tiny_llama()
    am = AdaptedModel.attach(
        model, BottleneckConfig(bottleneck_size=4, adapter_dropout=0.5, init_weights=False), "d"
    )
    am.add_adapter("plain", BottleneckConfig(bottleneck_size=4, init_weights=False))
    layer = am.model.model.layers[0].mlp.down_proj
    with torch.no_grad():  # up = 0, bias b: the adapter adds exactly b, whatever dropout does inside
        layer.adapter_up["d"].weight.zero_()
    b = layer.adapter_up["d"].bias.detach()
    layer.train()
    x = torch.randn(3, 5, 32)
    y = layer.base_layer(x)
    torch.testing.assert_close(layer(x), y + b)  # the residual y is never dropped
    with torch.no_grad():
        layer.adapter_up["d"].weight.normal_()
    assert not torch.allclose(layer(x), layer(x)), "dropout acts in train mode"
    with am.mixed_batch(["d", None, "plain"]):  # per row: only row 0's adapter drops
        first, second = layer(x), layer(x)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(first[1:], second[1:])
    torch.testing.assert_close(first[1], y[1])


# -- placements and config ------------------------------------------------------------------------------
def test_houlsby_and_pfeiffer_target_their_layers_on_llama() -> None:
    layers = [f"model.layers.{i}" for i in (0, 1)]
    houlsby = AdaptedModel.attach(tiny_llama(), BottleneckConfig(config="houlsby", bottleneck_size=4))
    assert wrapped(houlsby) == sorted(
        f"{ly}.{m}" for ly in layers for m in ("self_attn.o_proj", "mlp.down_proj")
    )
    pfeiffer = AdaptedModel.attach(tiny_llama(), BottleneckConfig(config="pfeiffer", bottleneck_size=4))
    assert wrapped(pfeiffer) == [f"{ly}.mlp.down_proj" for ly in layers]
    only_last = BottleneckConfig(config="houlsby", bottleneck_size=4, layers_to_transform=[1])
    assert wrapped(AdaptedModel.attach(tiny_llama(), only_last)) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
    ]


def test_config_resolves_its_derived_defaults_and_round_trips() -> None:
    config = BottleneckConfig()
    assert (config.config, config.target_modules, config.bottleneck_size) == ("pfeiffer", ("down_proj",), 64)
    assert BottleneckConfig.from_dict(config.to_dict()) == config
    assert BottleneckConfig(config="houlsby").target_modules == ("o_proj", "down_proj")
    assert config.replace(config="houlsby").target_modules == ("o_proj", "down_proj")  # derived: follows
    chosen = BottleneckConfig(target_modules=["c_proj"])
    assert chosen.replace(config="houlsby").target_modules == ("c_proj",)  # chosen: kept
    by_factor = config.replace(reduction_factor=4)
    assert (by_factor.bottleneck_size, by_factor.reduction_factor) == (None, 4)
    assert by_factor.size_for(16) == 4 and by_factor.size_for(3) == 1
    assert by_factor.replace(bottleneck_size=8).reduction_factor is None
    assert BottleneckConfig(reduction_factor="2.5e0").reduction_factor == 2.5  # YAML's text floats


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"config": "lora"}, r"config: 'lora'; expected one of \('houlsby', 'pfeiffer'\)"),
        (
            {"non_linearity": "swish"},
            r"non_linearity: 'swish'.*'relu', 'gelu', 'silu', 'tanh'.*called 'silu'",
        ),
        (
            {"bottleneck_size": 8, "reduction_factor": 4},
            r"bottleneck_size \(8\) and reduction_factor \(4\) are both set",
        ),
        ({"bottleneck_size": 0}, r"bottleneck_size: 0; expected a positive integer"),
        ({"bottleneck_size": 2.5}, r"bottleneck_size: 2.5; expected a positive integer"),
        ({"reduction_factor": -1}, r"reduction_factor: -1; expected a positive number"),
        ({"adapter_dropout": 1.0}, r"adapter_dropout: 1.0; expected a number in \[0, 1\)"),
        ({"scaling": float("nan")}, r"scaling: nan; expected a positive number"),
        ({"init_weights": "yes"}, r"init_weights: 'yes'; expected true or false"),
        ({"target_modules": []}, r"target_modules: \(\); expected a non-empty list"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform"),
    ],
)
def test_bad_config_values_name_the_key_and_the_valid_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BottleneckConfig(**kwargs)


def test_bad_keys_and_targets_are_refused_and_change_nothing() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown bottleneck config key 'bottleneck_sise' \(did you mean 'bottleneck_size'\?\)",
    ):
        BottleneckConfig.from_dict({"bottleneck_sise": 8})
    model = tiny_llama()
    modules = dict(model.named_modules())
    with pytest.raises(TargetError, match=r"'model.embed_tokens' is a Embedding.*it wraps: nn.Linear"):
        AdaptedModel.attach(model, BottleneckConfig(target_modules=["embed_tokens"], bottleneck_size=4))
    assert dict(model.named_modules()) == modules
    with pytest.warns(
        UserWarning,
        match=r"bottleneck size 64 is wider than the output of 'model.layers.0.mlp.down_proj' \(16",
    ):
        am = AdaptedModel.attach(model, BottleneckConfig())
    with pytest.raises(AdapterStateError, match="cannot be merged"):
        am.merge()


# -- mixed batches --------------------------------------------------------------------------------------
def test_mixed_batch_rows_equal_single_adapter_runs() -> None:
    model = tiny_llama()
    plain = copy.deepcopy(model)
    am = AdaptedModel.attach(
        model, BottleneckConfig(config="houlsby", bottleneck_size=3, non_linearity="gelu"), "h"
    )
    am.add_adapter("p", BottleneckConfig(config="pfeiffer", bottleneck_size=5))  # absent on o_proj
    am.add_adapter(
        "s", BottleneckConfig(config="houlsby", bottleneck_size=2, non_linearity="silu", scaling=2.0)
    )
    for seed, name in enumerate("hps"):
        perturb(am, name, seed)
    names = ["h", None, "p", "s", "p", "base"]
    x = model_input("llama", batch=len(names), seed=1)
    mixed = output(am, x, adapter_names=names)
    for i, name in enumerate(names):
        if name in (None, "base"):
            torch.testing.assert_close(mixed[i], output(plain, x[i : i + 1])[0])
        else:
            am.set_adapter(name)
            torch.testing.assert_close(mixed[i], output(am, x[i : i + 1])[0], atol=1e-5, rtol=1e-4)


# -- the file format ------------------------------------------------------------------------------------
def saved_adapter(tmp_path: Path) -> tuple[AdaptedModel, torch.nn.Module, Path]:
    model = tiny_llama()
    fresh = copy.deepcopy(model)
    am = AdaptedModel.attach(
        model, BottleneckConfig(config="houlsby", reduction_factor=4, non_linearity="tanh"), "a"
    )
    perturb(am, "a")
    return am, fresh, am.save_adapter(tmp_path / "a")


def test_save_then_load_gives_the_same_outputs(tmp_path: Path) -> None:
    from safetensors import safe_open

    am, fresh, path = saved_adapter(tmp_path)
    x = model_input("llama")
    data = json.loads((path / "adapter_config.json").read_text())
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.o_proj")]
    assert data["peft_type"] == "BOTTLENECK" and data["format_version"] == 1
    assert data["config"] == "houlsby" and data["target_modules"] == modules
    assert (data["bottleneck_size"], data["reduction_factor"], data["non_linearity"]) == (None, 4, "tanh")
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    roles = {
        "adapter_down.weight": (4, 16),
        "adapter_down.bias": (4,),
        "adapter_up.weight": (16, 4),
        "adapter_up.bias": (16,),
    }
    assert shapes == {f"{PREFIX}{m}.{r}": s for m in modules for r, s in roles.items()}
    assert metadata["peftkit_method"] == "bottleneck" and metadata["peftkit_adapter_name"] == "a"
    facts = adapter_info(path)
    assert (facts["method"], facts["bottleneck_sizes"], facts["target_layers"]) == (
        "Bottleneck adapter (Houlsby)",
        [4],
        4,
    )
    assert re.search(r"\nbottleneck +4 \(layer width // 4\), tanh, scaling 1\n", format_info(facts))
    loaded = AdaptedModel.from_pretrained(fresh, path, "a")
    assert loaded.adapter_config("a") == am.adapter_config("a").replace(target_modules=modules)
    assert torch.equal(output(loaded, x), output(am, x))


@pytest.mark.parametrize(
    "version,match",
    [
        (2, r"format_version 2; this peftkit reads format_version 1 \(a newer peftkit wrote it"),
        ("1", r"format_version '1'; this peftkit reads format_version 1 \(no peftkit writes"),
        (None, r"needs a format_version, and this one has none; this peftkit reads format_version 1"),
    ],
)
def test_an_unknown_format_version_is_refused(tmp_path: Path, version, match: str) -> None:
    _, fresh, path = saved_adapter(tmp_path)
    config_file = path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["format_version"] = version
    if version is None:
        del data["format_version"]
    config_file.write_text(json.dumps(data))
    am = AdaptedModel(fresh)
    with pytest.raises(AdapterFileError, match=match):
        am.load_adapter(path)
    assert am.adapters == [] and not wrapped(am)


# -- training -------------------------------------------------------------------------------------------
def test_a_few_adamw_steps_lower_the_loss_and_change_only_the_adapter() -> None:
    model = tiny_llama()
    with torch.no_grad():  # at the 0.02 init the frozen head spans ~±0.6 logits: too flat to learn through
        model.lm_head.weight.mul_(20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = AdaptedModel.attach(model, BottleneckConfig(config="houlsby", bottleneck_size=8))
    adapter = am.adapter_state_dict("default")
    trainable = [p for p in am.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter.values()}
    start = {k: v.detach().clone() for k, v in adapter.items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    x = model_input("llama", batch=4, seq=12)
    am.train()
    losses = []
    for _ in range(8):
        loss = am(input_ids=x, labels=x).loss  # next-token cross-entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses
    assert all(not torch.equal(adapter[k], start[k]) for k in adapter), "every adapter tensor trains"
    assert all(torch.equal(before[k], v) for k, v in am.base_tensors())


# -- docs and example config ----------------------------------------------------------------------------
def test_the_format_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "formats.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/formats.md has a Python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/formats.md", "exec"), {"__name__": "docs_example"})


def test_the_example_config_is_a_valid_bottleneck_config() -> None:
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "dates_bottleneck.yaml").read_text())
    assert data["method"] == "bottleneck"
    config = BottleneckConfig.from_dict(data["bottleneck"])
    assert config.config in ("houlsby", "pfeiffer")
