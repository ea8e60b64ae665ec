"""Which layers an adapter lands on: HF PEFT's matching rules, per-module ranks, saved modules, biases."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import model_input, output, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn

from peftkit import AdaptedModel, LoraConfig, TargetError
from peftkit.core.inject import find_targets
from peftkit.core.saved_modules import ModulesToSave
from peftkit.errors import ConfigError
from peftkit.methods import METHODS, LoraLayer
from peftkit.methods.targets import Targets

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJ += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def llama_layers(*suffixes: str, layers: tuple[int, ...] = (0, 1)) -> set[str]:
    """Full names of the given sub-modules of tiny Llama's decoder layers."""
    return {f"model.layers.{i}.{s}" for i in layers for s in suffixes}


def adapted(model: nn.Module, **config) -> set[str]:
    """The names of the layers a LoRA adapter with `config` lands on."""
    am = AdaptedModel.attach(model, LoraConfig(**config))
    return {n for n, m in am.model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["q_proj"], llama_layers("self_attn.q_proj")),
        (["self_attn.q_proj"], llama_layers("self_attn.q_proj")),
        (["layers.1.self_attn.q_proj"], llama_layers("self_attn.q_proj", layers=(1,))),
        (["model.layers.0.mlp.up_proj"], llama_layers("mlp.up_proj", layers=(0,))),
        (
            ["q_proj", "down_proj", "embed_tokens"],
            llama_layers("self_attn.q_proj", "mlp.down_proj") | {"model.embed_tokens"},
        ),
    ],
    ids=["name", "dotted-suffix", "longer-suffix", "full-name", "several"],
)
def test_list_entries_match_whole_names_or_dotted_suffixes(targets: list[str], expected: set[str]) -> None:
    assert adapted(tiny_llama(), target_modules=targets) == expected


@pytest.mark.parametrize("target", ["proj", "_proj", "q_pro", "elf_attn.q_proj", "yers.0.self_attn.q_proj"])
def test_substrings_never_match(target: str) -> None:
    model = tiny_llama()
    with pytest.raises(TargetError, match="matched no layer"):
        AdaptedModel.attach(model, LoraConfig(target_modules=[target]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize(
    "regex,expected",
    [
        (
            r"model\.layers\.0\.self_attn\.(q|v)_proj",
            llama_layers("self_attn.q_proj", "self_attn.v_proj", layers=(0,)),
        ),
        (r".*\.(q|v)_proj", llama_layers("self_attn.q_proj", "self_attn.v_proj")),
        (r".*\.1\..*_proj", llama_layers(*PROJ, layers=(1,))),
    ],
)
def test_a_string_is_a_regex_matched_against_the_full_name(regex: str, expected: set[str]) -> None:
    assert adapted(tiny_llama(), target_modules=regex) == expected


@pytest.mark.parametrize(
    "regex", [r"model\.layers\.0\.self_attn\.q", r"layers\.0\.self_attn\.q_proj", "q_pro"]
)
def test_a_regex_must_match_the_whole_name(regex: str) -> None:
    with pytest.raises(TargetError, match="matched no layer") as err:
        AdaptedModel.attach(tiny_llama(), LoraConfig(target_modules=regex))
    assert r"a single string is a regex over the full module name (start it with '.*\.'" in str(err.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("q_proj", llama_layers("self_attn.q_proj")),
        ("mlp.down_proj", llama_layers("mlp.down_proj")),
        ("layers.1.self_attn.v_proj", llama_layers("self_attn.v_proj", layers=(1,))),
        ("model.layers.0.mlp.up_proj", llama_layers("mlp.up_proj", layers=(0,))),  # also a full match
    ],
)
def test_a_plain_name_string_matches_like_a_one_item_list(name: str, expected: set[str]) -> None:
    # `--lora.target_modules q_proj` gives the string "q_proj": as a full-name regex it matches
    # nothing, while the error listed q_proj as adaptable.
    assert adapted(tiny_llama(), target_modules=name) == expected


def test_a_plain_name_string_saves_as_the_layers_it_matched(tmp_path: Path) -> None:
    from peft import PeftModel

    model, x = tiny_llama(), model_input("llama")
    twin = copy.deepcopy(model)
    am = AdaptedModel.attach(model, LoraConfig(target_modules="q_proj", init_lora_weights=False))
    am.save_adapter(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(llama_layers("self_attn.q_proj"))  # the same in HF PEFT
    theirs = PeftModel.from_pretrained(twin, tmp_path / "a").eval()
    torch.testing.assert_close(output(theirs, x), output(am, x), atol=1e-5, rtol=1e-5)


def test_new_adapters_name_list_entries_that_match_nothing() -> None:
    model = tiny_llama()
    with pytest.raises(TargetError) as err:
        find_targets(model, LoraConfig(target_modules=["q_proj", "v_prj"]), strict=True)
    assert "target_modules entry 'v_prj' matches no module of LlamaForCausalLM" in str(err.value)
    assert "did you mean 'v_proj'?" in str(err.value)
    exclude = LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "lm_haed"])
    with pytest.raises(TargetError, match="exclude_modules entry 'lm_haed'.*did you mean 'lm_head'"):
        find_targets(model, exclude, strict=True)
    as_regex = LoraConfig(target_modules="all-linear", exclude_modules="o_proj")
    with pytest.raises(TargetError, match=r"regex over the full module name, did you mean \['o_proj'\]"):
        find_targets(model, as_regex, strict=True)
    # Loading stays as lenient as HF PEFT, whose files may list names for several architectures.
    lenient = find_targets(model, LoraConfig(target_modules=["q_proj", "c_attn"]))
    assert {t.name for t in lenient} == llama_layers("self_attn.q_proj")


def test_a_loaded_file_may_list_modules_the_model_lacks(tmp_path: Path) -> None:
    model, x = tiny_llama(), model_input("llama")
    fresh = copy.deepcopy(model)
    am = AdaptedModel.attach(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    am.save_adapter(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "target_modules": ["q_proj", "c_attn", "query"]}))
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path / "a")
    torch.testing.assert_close(output(loaded, x), output(am, x), atol=0, rtol=0)


def test_a_rank_above_a_layers_smaller_dimension_is_warned_about() -> None:
    # Tiny Llama's k_proj and v_proj are 16 -> 8: their update has rank <= 8 whatever r says.
    model = tiny_llama()
    config = LoraConfig(r=16, target_modules="all-linear")
    with pytest.warns(UserWarning) as caught:
        find_targets(model, config, strict=True)
    message = str(caught[0].message)
    assert "rank 16 is more than the smaller dimension of 'model.layers.0.self_attn.k_proj'" in message
    assert "(16 in, 8 out) (and 3 more layers)" in message and "Use r <= 8" in message
    assert "rank_pattern, e.g. {'k_proj': 8}" in message
    fixed = [
        config.replace(rank_pattern={"k_proj": 8, "v_proj": 4}),  # rank_pattern counts
        config.replace(r=8),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ok in fixed:
            find_targets(model, ok, strict=True)
        find_targets(model, config)  # a loaded adapter's rank is its author's choice: no warning


def test_pattern_keys_that_match_no_target_are_warned_about() -> None:
    config = LoraConfig(
        target_modules=["q_proj"], rank_pattern={"q_proj": 2, "v_proj": 4}, alpha_pattern={"x": 1}
    )
    with pytest.warns(UserWarning) as caught:
        find_targets(tiny_llama(), config, strict=True)
    messages = [str(w.message) for w in caught]
    assert any("rank_pattern keys ['v_proj'] match no target layer" in m for m in messages)
    assert any("alpha_pattern keys ['x'] match no target layer" in m for m in messages)


@pytest.mark.parametrize("tie", [False, True])
def test_all_linear_skips_the_output_head_and_embeddings(tie: bool) -> None:
    assert adapted(tiny_llama(tie=tie), target_modules="all-linear") == llama_layers(*PROJ)


def test_all_linear_includes_gpt2_conv1d() -> None:
    am = AdaptedModel.attach(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    layers = {n: m for n, m in am.model.named_modules() if isinstance(m, LoraLayer)}
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert set(layers) == {f"transformer.h.{i}.{p}" for i in (0, 1) for p in parts}
    assert all(type(m.base_layer).__name__ == "Conv1D" for m in layers.values())
    assert isinstance(am.model.lm_head, nn.Linear)


@pytest.mark.parametrize(
    "exclude,expected",
    [
        (
            ["q_proj", "mlp.down_proj"],
            llama_layers(*(p for p in PROJ if p not in ("self_attn.q_proj", "mlp.down_proj"))),
        ),
        (r".*\.0\..*", llama_layers(*PROJ, layers=(1,))),
    ],
    ids=["names", "regex"],
)
def test_exclude_modules(exclude: list[str] | str, expected: set[str]) -> None:
    assert adapted(tiny_llama(), target_modules="all-linear", exclude_modules=exclude) == expected


def test_excluding_every_target_is_an_error() -> None:
    with pytest.raises(TargetError, match=r"exclude_modules=\['q_proj'\]"):
        AdaptedModel.attach(tiny_llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


@pytest.mark.parametrize("pattern", [None, "layers", ["h", "layers"]])
def test_layers_to_transform_on_llama(pattern: str | list[str] | None) -> None:
    config = {
        "target_modules": ["q_proj", "down_proj"],
        "layers_to_transform": [1],
        "layers_pattern": pattern,
    }
    assert adapted(tiny_llama(), **config) == llama_layers("self_attn.q_proj", "mlp.down_proj", layers=(1,))


def test_layers_to_transform_with_gpt2s_layer_list() -> None:
    names = adapted(tiny_gpt2(), target_modules=["c_attn", "c_fc"], layers_to_transform=0, layers_pattern="h")
    assert names == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"}


@pytest.mark.parametrize("method", ["lora", "ia3", "bottleneck"])
def test_layer_configs_embed_their_target_fields_as_one_targets_value(method: str) -> None:
    """What matching reads is one `Targets`, normalised like the flat fields the file and CLI keep."""
    fields = {"target_modules": ["q_proj"], "exclude_modules": ["layers.0.self_attn.q_proj"]}
    fields |= {"layers_to_transform": 1, "layers_pattern": "layers", "modules_to_save": ["lm_head"]}
    extra = {"feedforward_modules": []} if method == "ia3" else {}
    config = METHODS[method].config_cls(**fields, **extra)
    expected = Targets(("q_proj",), ("layers.0.self_attn.q_proj",), (1,), ("layers",), ("lm_head",))
    assert config.targets == expected
    assert {k: config.to_dict()[k] for k in fields} == {
        "target_modules": ["q_proj"],
        "exclude_modules": ["layers.0.self_attn.q_proj"],
        "layers_to_transform": [1],
        "layers_pattern": ["layers"],
        "modules_to_save": ["lm_head"],
    }
    assert config.replace(layers_to_transform=[0]).targets.layers_to_transform == (0,)
    with pytest.raises(ConfigError, match="layers_to_transform"):
        Targets("q_proj", layers_to_transform=[-1])


def test_layers_pattern_that_is_not_in_the_names_matches_nothing() -> None:
    with pytest.raises(TargetError, match=r"layers_to_transform=\[0\]"):
        AdaptedModel.attach(
            tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="h")
        )


def test_rank_and_alpha_patterns_give_per_module_ranks(tmp_path: Path) -> None:
    model, x = tiny_llama(), model_input("llama")
    fresh = copy.deepcopy(model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 3, "proj": 5},  # "proj" is no suffix
        alpha_pattern={"v_proj": 4},
        init_lora_weights=False,
    )
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['proj'\] match no target layer"):
        am = AdaptedModel.attach(model, config)
    layers = {n: m for n, m in am.model.named_modules() if isinstance(m, LoraLayer)}
    ranks = {n: m.lora_A["default"].shape[0] for n, m in layers.items()}
    expected = dict.fromkeys(layers, 8) | dict.fromkeys(llama_layers("self_attn.q_proj"), 2)
    expected["model.layers.1.mlp.down_proj"] = 3
    assert ranks == expected
    down = layers["model.layers.1.mlp.down_proj"]
    assert down.lora_A["default"].shape == (3, 32) and down.lora_B["default"].shape == (16, 3)
    # the update's scale is alpha / r with the per-module values: 4/8 on v_proj, 16/2 on q_proj
    h = torch.randn(2, 16)
    for name, scale in (("model.layers.0.self_attn.v_proj", 0.5), ("model.layers.0.self_attn.q_proj", 8.0)):
        layer = layers[name]
        low_rank = h @ layer.lora_A["default"].T @ layer.lora_B["default"].T
        torch.testing.assert_close(layer(h) - layer.base_layer(h), scale * low_rank)
    am.save_adapter(tmp_path / "a")
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path / "a")
    assert {n: m.lora_A["default"].shape[0] for n, m in loaded.model.named_modules() if n in ranks} == ranks
    torch.testing.assert_close(output(loaded, x), output(am, x), atol=0, rtol=0)


def test_modules_to_save_trains_a_copy_and_keeps_the_original(tmp_path: Path) -> None:
    model, x = tiny_bert(), model_input("bert")
    fresh = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    config = LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    am = AdaptedModel.attach(model, config)
    wrapper = am.model.classifier
    assert isinstance(wrapper, ModulesToSave)
    copy_params = list(wrapper.modules_to_save["default"].parameters())
    assert all(p.requires_grad for p in copy_params)
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    opt = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=0.5)
    output(am, x).square().sum().backward()
    opt.step()
    assert all(torch.equal(wrapper.original_module.state_dict()[k], v) for k, v in original.items())
    assert not torch.equal(wrapper.modules_to_save["default"].weight, original["weight"])
    with am.disable_adapters():
        torch.testing.assert_close(output(am, x), output(fresh, x))
    trained = output(am, x)
    assert not torch.allclose(trained, output(fresh, x))
    mixed = output(am, x, adapter_names=["default", None, "default"])
    torch.testing.assert_close(mixed[[0, 2]], trained[[0, 2]])
    torch.testing.assert_close(mixed[1], output(fresh, x)[1])
    am.save_adapter(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path / "a")
    torch.testing.assert_close(output(loaded, x), trained, atol=0, rtol=0)
    assert all(torch.equal(fresh.classifier.original_module.state_dict()[k], v) for k, v in original.items())


def _bert_biases(model: nn.Module, wrapped_only: bool) -> set[str]:
    """Bias names in the wrapped BERT: all of them, or only those of LoRA-wrapped layers."""
    names = {n for n, _ in model.named_parameters() if n.endswith(".bias") and ".lora_" not in n}
    return {n for n in names if n.endswith(".base_layer.bias")} if wrapped_only else names


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_marks_and_saves_the_right_biases(bias: str, tmp_path: Path) -> None:
    model, x = tiny_bert(), model_input("bert")
    fresh = copy.deepcopy(model)
    am = AdaptedModel.attach(model, LoraConfig(target_modules=["query"], bias=bias))
    biases = _bert_biases(am.model, wrapped_only=bias == "lora_only")
    assert {f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)} <= biases
    assert ("classifier.bias" in biases) == (bias == "all")
    trainable = {n for n, p in am.model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == biases
    with torch.no_grad():  # stand-in for training the biases
        for n, p in am.model.named_parameters():
            if n in biases:
                p.add_(0.5)
    trained = output(am, x)
    am.save_adapter(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = {k for k in f.keys() if k.endswith(".bias")}  # noqa: SIM118
    assert keys == {f"base_model.model.{n}" for n in biases}
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path / "a", check_base=False)
    torch.testing.assert_close(output(loaded, x), trained, atol=0, rtol=0)


def test_an_adapter_with_trained_biases_loads_into_its_own_base(tmp_path: Path) -> None:
    model, x = tiny_bert(), model_input("bert")
    fresh = copy.deepcopy(model)
    am = AdaptedModel.attach(model, LoraConfig(target_modules=["query"], bias="lora_only"))
    with torch.no_grad():
        am.model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(0.5)
    am.save_adapter(tmp_path / "a")
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path / "a")
    torch.testing.assert_close(output(loaded, x), output(am, x), atol=0, rtol=0)
