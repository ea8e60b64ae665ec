"""IA³: parity with HF PEFT (the oracle) on Llama, GPT-2 (transposed Conv1D) and convolutions, files
that load in either library, per-row mixing of input- and output-scaling adapters, a 4-bit base, and
the errors for a bad config or a layer IA³ cannot scale. The shared behaviour (zero init, disabled,
merge/unmerge, save/load, mixed batches, training) is in test_contract.py.

Everything runs in fp32, eval mode. Both libraries compute the same products (IA³ has no sums to
reorder), so outputs agree to float32 rounding: within 1e-6 of the output scale.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import MODELS, model_input, output, tiny_cnn, tiny_llama
from torch import Tensor, nn

import peftkit
from peftkit import AdaptedModel, AdapterFileError, AdapterStateError, ConfigError, TargetError
from peftkit.base.nf4 import NF4Linear, quantize_model
from peftkit.methods.ia3 import SPEC, IA3Layer
from peftkit.methods.ia3_config import IA3Config, config_from_file
from peftkit.tools.info import adapter_info, format_info

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's fan_in_fan_out, unmerge notes

ATOL_OF_SCALE = 1e-6
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "cnn": None}


@dataclass(frozen=True)
class Case:
    arch: str  # a key of conftest.MODELS
    targets: tuple[str, ...]
    feedforward: tuple[str, ...]


CASES = {
    "llama": Case("llama", ("k_proj", "v_proj", "down_proj"), ("down_proj",)),  # PEFT's Llama defaults
    # GPT-2's Conv1D stores (in, out); c_attn has a bias, which output scaling scales too.
    "gpt2": Case("gpt2", ("c_attn", "attn.c_proj", "mlp.c_proj"), ("mlp.c_proj",)),
    "cnn": Case("cnn", ("conv1", "conv2", "fc1"), ("conv2",)),  # Conv2d out- and in-scaled, Linear
}


def kit_config(case: Case, **changes: object) -> IA3Config:
    fields = dict(target_modules=case.targets, feedforward_modules=case.feedforward, init_ia3_weights=False)
    return IA3Config(**{**fields, **changes})


def peft_config(case: Case) -> object:
    return peft.IA3Config(
        task_type=TASKS[case.arch],
        target_modules=list(case.targets),
        feedforward_modules=list(case.feedforward),
        fan_in_fan_out=case.arch == "gpt2",
    )


def twins(arch: str) -> tuple[nn.Module, nn.Module]:
    """Two copies of one random base model, biases made nonzero (GPT-2 starts them at 0), so a library
    that forgot to scale a bias, merged or not, would be caught."""
    a, b = MODELS[arch](), MODELS[arch]()
    with torch.no_grad():
        for name, p in a.named_parameters():
            if name.endswith("bias"):
                p.add_(0.5 * torch.randn(p.shape))
    b.load_state_dict(a.state_dict())
    return a, b


def copy_into_peft(am: AdaptedModel, pm: nn.Module, name: str) -> None:
    """peftkit's vectors into PEFT's parameters (file key `<path>.ia3_l` is `<path>.ia3_l.<name>` there)."""
    theirs = dict(pm.named_parameters())
    ours = am.adapter_state_dict(name)
    assert {f"{k}.{name}" for k in ours} == {n for n in theirs if n.endswith(f"ia3_l.{name}")}
    with torch.no_grad():
        for key, value in ours.items():
            theirs[f"{key}.{name}"].copy_(value)  # copy_ checks the shapes: PEFT's layout is ours


def assert_close(got: Tensor, expected: Tensor, what: str) -> float:
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL_OF_SCALE * scale, f"{what}: max |diff| {diff:.3g} at scale {scale:.3g}"
    return diff


def assert_changes(adapted: Tensor, base: Tensor) -> None:
    assert (adapted - base).abs().max().item() > 1e-2 * base.abs().max().item()


# -- the same vectors give the same outputs ---------------------------------------------------------------
@pytest.mark.parametrize("arch", list(CASES))
@torch.no_grad()
def test_same_vectors_agree_with_peft_unmerged_and_merged(arch: str) -> None:
    case, (kit_base, peft_base) = CASES[arch], twins(arch)
    x = model_input(arch)
    base_out = output(peft_base, x)
    am = AdaptedModel.attach(kit_base, kit_config(case))
    pm = peft.get_peft_model(peft_base, peft_config(case)).eval()
    copy_into_peft(am, pm, "default")
    expected = output(pm, x)
    assert_changes(expected, base_out)
    assert_close(output(am, x), expected, "unmerged")
    pm.merge_adapter()
    am.merge()
    assert_close(output(am, x), output(pm, x), "merged")
    am.unmerge()
    assert_close(output(am, x), expected, "unmerged again")


@torch.no_grad()
def test_two_active_adapters_multiply_as_in_peft() -> None:
    case, (kit_base, peft_base) = CASES["llama"], twins("llama")
    x = model_input("llama")
    am = AdaptedModel.attach(kit_base, kit_config(case), "a")
    am.add_adapter("b", kit_config(case))
    pm = peft.get_peft_model(peft_base, peft_config(case), adapter_name="a")
    pm.add_adapter("b", peft_config(case))
    for name in "ab":
        copy_into_peft(am, pm, name)
    am.set_adapter(["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    expected = output(pm.eval(), x)
    assert_close(output(am, x), expected, "a and b active")
    # The formula on one output-scaled layer: base(h) ⊙ l_a ⊙ l_b.
    layer = am.model.model.layers[0].self_attn.k_proj
    h = torch.randn(2, 3, 16)
    scale = (layer.ia3_l["a"] * layer.ia3_l["b"]).flatten()  # (out,)
    torch.testing.assert_close(layer(h), layer.base_layer(h) * scale, rtol=0, atol=0)
    am.merge()
    assert_close(output(am, x), expected, "a and b merged")


# -- files, both ways ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_peftkit_file_loads_in_peft_and_peft_file_in_peftkit(arch: str, tmp_path: Path) -> None:
    case, (kit_base, peft_base) = CASES[arch], twins(arch)
    x = model_input(arch)
    am = AdaptedModel.attach(copy.deepcopy(kit_base), kit_config(case))
    expected = output(am, x)
    am.save_adapter(tmp_path / "kit")
    data = json.loads((tmp_path / "kit" / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3" and data["fan_in_fan_out"] == (arch == "gpt2")
    assert data["feedforward_modules"] and set(data["feedforward_modules"]) <= set(data["target_modules"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), tmp_path / "kit").eval()
    assert_close(output(pm, x), expected, "PEFT on peftkit's file")

    pm = peft.get_peft_model(peft_base, peft_config(case)).eval()
    with torch.no_grad():  # PEFT's vectors start at 1: move them as training would
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.add_(0.3 * torch.randn(p.shape))
    pm.save_pretrained(tmp_path / "peft")
    loaded = AdaptedModel.from_pretrained(kit_base, tmp_path / "peft")
    assert loaded.adapter_config().feedforward_modules == case.feedforward
    assert_close(output(loaded, x), output(pm, x), "peftkit on PEFT's file")


def test_info_names_the_scaled_layers(tmp_path: Path) -> None:
    am = AdaptedModel.attach(tiny_llama(), IA3Config())
    am.save_adapter(tmp_path)
    facts = adapter_info(tmp_path)
    assert facts["method"] == "IA³" and facts["target_layers"] == 6
    assert facts["input_scaled"] == {"down_proj": 2}
    assert facts["output_scaled"] == {"k_proj": 2, "v_proj": 2}
    text = format_info(facts)
    assert "\nscales outputs   k_proj, v_proj (4 layers)\nscales inputs    down_proj (2 layers)\n" in text


# -- mixed batches ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_mixed_batch_with_input_and_output_scaling_on_one_layer() -> None:
    """Adapter "in" scales down_proj's input, "out" its output, "attn" touches only attention: every
    row equals its adapter run alone, and rows of adapters absent from a layer pass through it."""
    am = AdaptedModel.attach(tiny_llama(), IA3Config(init_ia3_weights=False), "in")
    am.add_adapter("out", IA3Config(feedforward_modules=[], init_ia3_weights=False))
    am.add_adapter(
        "attn", IA3Config(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=False)
    )
    down = am.model.model.layers[0].mlp.down_proj
    assert down.ia3_l["in"].shape == (1, 32) and down.ia3_l["out"].shape == (16, 1)
    names = ["out", "in", None, "attn", "in", "out"]
    x = model_input("llama", batch=len(names), seed=3)
    mixed = output(am, x, adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            with am.disable_adapters():
                ref = output(am, x[i : i + 1])
        else:
            am.set_adapter(name)
            ref = output(am, x[i : i + 1])
        torch.testing.assert_close(mixed[i], ref[0], atol=1e-6, rtol=1e-5)


# -- other layer types and bases ---------------------------------------------------------------------------
@torch.no_grad()
def test_grouped_conv_input_scaling_merges_exactly_as_peft() -> None:
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1))
    twin = copy.deepcopy(conv)
    x = torch.randn(2, 4, 5, 5)
    am = AdaptedModel.attach(
        conv, IA3Config(target_modules=["0"], feedforward_modules=["0"], init_ia3_weights=False)
    )
    pm = peft.get_peft_model(twin, peft.IA3Config(target_modules=["0"], feedforward_modules=["0"])).eval()
    copy_into_peft(am, pm, "default")
    expected = pm(x)
    assert_close(am(x), expected, "grouped conv, unmerged")
    am.merge()
    assert_close(am(x), expected, "grouped conv, merged")


@torch.no_grad()
def test_over_a_4bit_base_equals_the_dequantized_base() -> None:
    quantized = tiny_llama()
    quantize_model(quantized, compute_dtype=torch.float32)
    dense = copy.deepcopy(quantized)
    for name, m in list(dense.named_modules()):
        if isinstance(m, NF4Linear):
            dense.set_submodule(name, m.to_linear())
    x = model_input("llama")
    am4 = AdaptedModel.attach(quantized, IA3Config(init_ia3_weights=False))
    am = AdaptedModel.attach(dense, IA3Config())
    for key, value in am4.adapter_state_dict("default").items():
        am.adapter_state_dict("default")[key].copy_(value)
    assert_close(output(am4, x), output(am, x), "4-bit base")
    with pytest.raises(AdapterStateError, match="4-bit"):
        am4.merge()


def test_vectors_take_the_base_dtype_unless_told() -> None:
    model = tiny_llama().to(torch.bfloat16)
    am = AdaptedModel.attach(model, IA3Config(init_ia3_weights=False), "bf16")
    am.add_adapter("fp32", IA3Config(init_ia3_weights=False), dtype=torch.float32)
    layer = am.model.model.layers[0].mlp.down_proj
    assert layer.ia3_l["bf16"].dtype == torch.bfloat16 and layer.ia3_l["fp32"].dtype == torch.float32
    am.set_adapter("fp32")
    assert output(am, model_input("llama")).dtype == torch.bfloat16


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": ["k_proj"]}, r"feedforward_modules entry 'down_proj' is not in target_modules"),
        ({"feedforward_modules": None}, r"invalid value for feedforward_modules: None; .*\[\] for none"),
        ({"feedforward_modules": "all-linear"}, r"feedforward_modules cannot be 'all-linear'"),
        ({"target_modules": []}, r"invalid value for target_modules"),
        ({"init_ia3_weights": "yes"}, r"invalid value for init_ia3_weights: 'yes'; expected true or false"),
        ({"layers_to_transform": [-1]}, r"invalid value for layers_to_transform"),
        ({"exclude_modules": "(unclosed"}, r"exclude_modules is not a valid regular expression"),
    ],
)
def test_bad_config_names_the_key(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IA3Config(**fields)


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown IA³ config key 'feedforward_module' \(did you mean 'feedforward_modules'\?\)",
    ):
        IA3Config.from_dict({"feedforward_module": ["down_proj"]})
    assert IA3Config.from_dict({"target_modules": ["q_proj"], "feedforward_modules": []}).replace(
        init_ia3_weights=False
    ) == IA3Config(target_modules=("q_proj",), feedforward_modules=(), init_ia3_weights=False)


def test_layers_ia3_cannot_scale_are_a_target_error_and_change_nothing() -> None:
    model = tiny_llama()
    modules = dict(model.named_modules())
    with pytest.raises(
        TargetError, match=r"'model.embed_tokens' is a Embedding, which ia3 cannot wrap; it wraps: nn.Linear"
    ):
        AdaptedModel.attach(model, IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(TargetError, match=r"'seq' is a Conv1d"):  # PEFT's IA³ has no nn.Conv1d either
        AdaptedModel.attach(tiny_cnn(), IA3Config(target_modules=["seq"], feedforward_modules=[]))
    # all-linear with the Llama default feedforward_modules on GPT-2: down_proj is no target there.
    with pytest.raises(TargetError, match=r"feedforward_modules entry 'down_proj' matches none of .* c_attn"):
        AdaptedModel.attach(MODELS["gpt2"](), IA3Config(target_modules="all-linear"))
    with pytest.raises(TargetError, match=r"a single string is a regex .*did you mean \['down_proj'\]"):
        AdaptedModel.attach(model, IA3Config(target_modules="all-linear", feedforward_modules="down_proj"))
    assert dict(model.named_modules()) == modules
    assert not any(isinstance(m, IA3Layer) for m in model.modules())


def test_adapter_file_with_unknown_options_or_null_modules_is_refused(tmp_path: Path) -> None:
    base = {"target_modules": ["k_proj"], "feedforward_modules": [], "fan_in_fan_out": False}
    assert config_from_file(base, tmp_path) == IA3Config(target_modules=("k_proj",), feedforward_modules=())
    with pytest.raises(
        AdapterFileError, match=r"uses ia3_dropout=0.1, an option peftkit's IA³ does not support"
    ):
        config_from_file({**base, "ia3_dropout": 0.1}, tmp_path)
    with pytest.raises(AdapterFileError, match=r"feedforward_modules is missing or null"):
        config_from_file({**base, "feedforward_modules": None}, tmp_path)
    assert SPEC.key_suffix("ia3_l", None) == "ia3_l" and peftkit.METHODS["ia3"] is SPEC
