"""Parity with HF PEFT, the oracle: the same base weights and the same adapter weights give the same
outputs (and gradients) in both libraries, and an adapter saved by either one loads in the other.

Every case builds one base model and copies its state_dict into a twin: peftkit goes on one, PEFT on
the other. Adapters start from init_lora_weights=False (B random, so they change the output), DoRA
magnitudes and modules_to_save copies are perturbed as well, and everything runs in fp32, eval mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODELS, model_input, output
from safetensors import safe_open
from torch import Tensor, nn

import peftkit

peft = pytest.importorskip("peft")

# PEFT warns about tied embeddings, save_embedding_layers, fan_in_fan_out, ...: none is a failure here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Both libraries compute the same sums in different orders (fused addmm vs two linears, different
# merge and DoRA formulas), so results differ by float32 rounding carried through a few layers. The
# scale is max |PEFT's output| (per row in mixed batches; the largest gradient for gradients). The
# largest difference seen is 7e-7 of the scale; 1e-5 leaves headroom for other BLAS builds and is
# four orders of magnitude below what the adapters do to the outputs (>= 0.1 of the scale, and
# `assert_changes` requires > 1e-2), so a wrong scaling, a missed layer or a missed magnitude fails.
RTOL_OF_SCALE = 1e-5
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "cnn": None}


@dataclass(frozen=True)
class Case:
    """One architecture and the layers adapted on it."""

    id: str
    arch: str  # a key of conftest.MODELS
    targets: tuple[str, ...] | str
    options: dict[str, Any] = field(default_factory=dict)  # more LoraConfig fields, same on both sides
    tied: bool = False  # a target's weight is tied to another module's (GPT-2: wte is lm_head)


LLAMA = Case("llama-all-linear", "llama", "all-linear")
CNN = Case("cnn", "cnn", ("conv1", "conv2", "seq", "fc1"))  # Conv2d, Conv2d, Conv1d, Linear
CASES = [
    LLAMA,
    Case("llama-embed", "llama", ("embed_tokens", "q_proj", "v_proj", "down_proj")),
    Case("gpt2", "gpt2", ("c_attn", "c_proj", "c_fc", "wte"), tied=True),  # transformers Conv1D
    Case("bert", "bert", ("query", "value", "dense"), {"modules_to_save": ("classifier",)}),
    CNN,
]
PATTERNS = Case(
    "llama-patterns",
    "llama",
    ("q_proj", "v_proj", "down_proj"),
    {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, "alpha_pattern": {"v_proj": 3.0}},
)
LAYERS = Case(
    "llama-layers",
    "llama",
    ("q_proj", "o_proj", "up_proj"),
    {"layers_to_transform": (1,), "layers_pattern": "layers"},
)


def matrix(marks: dict[str, pytest.MarkDecorator] | None = None) -> list[Any]:
    """Every case x variant, plus the pattern and layer-selection cases; `marks`: {case id: mark}."""
    pairs = [(c, v) for c in CASES for v in VARIANTS] + [(PATTERNS, "rslora"), (LAYERS, "dora")]
    marks = marks or {}
    return [pytest.param(c, v, id=f"{c.id}-{v}", marks=marks.get(c.id, ())) for c, v in pairs]


# -- setup ------------------------------------------------------------------------------------------
def kit_config(case: Case, variant: str, **changes: Any) -> peftkit.LoraConfig:
    fields = dict(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False)
    return peftkit.LoraConfig(**{**fields, **case.options, **VARIANTS[variant], **changes})


def peft_config(case: Case, variant: str, **changes: Any) -> Any:
    """PEFT's config for the same adapter (GPT-2's transposed Conv1D must be declared there)."""
    fields = kit_config(case, variant, **changes).to_dict()
    fields["fan_in_fan_out"] = case.arch == "gpt2"
    return peft.LoraConfig(task_type=TASKS[case.arch], **fields)


def twin_bases(case: Case) -> tuple[nn.Module, nn.Module]:
    """Two copies of one randomly initialised base model (the second loads the first's state_dict)."""
    a, b = MODELS[case.arch](), MODELS[case.arch]()
    b.load_state_dict(a.state_dict())
    return a, b


def perturb(params: dict[str, Tensor]) -> None:
    """Move DoRA magnitudes and modules_to_save copies off their initial values (A and B are random
    already), so a library that ignored them would be caught."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in params.items():
            if "lora_magnitude_vector" in key or ".lora_" not in key:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def peft_params(pm: nn.Module, adapter: str) -> dict[str, Tensor]:
    """PEFT's parameters of `adapter`: LoRA factors, magnitudes, modules_to_save copies."""
    return {n: p for n, p in pm.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")}


def peft_param_name(key: str, adapter: str) -> str:
    """The PeftModel parameter behind a PEFT file key (spelt out here, independent of both libraries)."""
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        return f"{key.removesuffix('.weight')}.{adapter}.weight"
    if key.endswith(".lora_magnitude_vector"):
        return f"{key}.{adapter}.weight"
    if key.endswith((".lora_embedding_A", ".lora_embedding_B")):
        return f"{key}.{adapter}"
    module, _, param = key.rpartition(".")  # a modules_to_save copy: <module>.<param>
    return f"{module}.modules_to_save.{adapter}.{param}"


def make_peft(case: Case, variant: str, base: nn.Module) -> nn.Module:
    pm = peft.get_peft_model(base, peft_config(case, variant))
    perturb(peft_params(pm, "default"))
    return pm.eval()


def paired(case: Case, adapters: dict[str, tuple[str, dict]]) -> tuple[peftkit.AdaptedModel, nn.Module]:
    """peftkit and PEFT on twin bases with the same adapters {name: (variant, config changes)}: no
    files, peftkit's random tensors copied into PEFT's parameters by name."""
    kit_base, peft_base = twin_bases(case)
    am, pm = peftkit.AdaptedModel(kit_base), None
    for name, (variant, changes) in adapters.items():
        am.add_adapter(name, kit_config(case, variant, **changes))
        cfg = peft_config(case, variant, **changes)
        pm = peft.get_peft_model(peft_base, cfg, adapter_name=name) if pm is None else pm
        if name not in pm.peft_config:
            pm.add_adapter(name, cfg)
        ours = am.adapter_state_dict(name)
        perturb(ours)
        theirs = peft_params(pm, name)
        assert {peft_param_name(k, name) for k in ours} == set(theirs)
        with torch.no_grad():
            for key, value in ours.items():
                theirs[peft_param_name(key, name)].copy_(value)  # copy_ checks the shapes
    return am.eval(), pm.eval()


def scale_of(t: Tensor) -> float:
    return t.abs().max().item()


def assert_close(got: Tensor, expected: Tensor, what: str, scale: float | None = None) -> None:
    """|got - expected| <= RTOL_OF_SCALE * scale everywhere (scale: max |expected| unless given)."""
    scale = scale_of(expected) if scale is None else scale
    diff = (got - expected).abs().max().item()
    assert diff <= RTOL_OF_SCALE * scale, f"{what}: max |diff| {diff:.3g} at scale {scale:.3g}"


def assert_changes(adapted: Tensor, base: Tensor) -> None:
    """The adapter moves the output by a clear margin, so agreeing on it means something."""
    assert (adapted - base).abs().max().item() > 1e-2 * scale_of(base)


def saved_keys(directory: Path) -> set[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return set(f.keys())


# -- through files, both ways ------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "variant"), matrix())
@torch.no_grad()
def test_peft_adapter_loads_in_peftkit(case: Case, variant: str, tmp_path: Path) -> None:
    kit_base, peft_base = twin_bases(case)
    x = model_input(case.arch)
    base_out = output(kit_base, x)
    pm = make_peft(case, variant, peft_base)
    pm.save_pretrained(tmp_path)  # PEFT's defaults: a targeted embed_tokens also saves its base weight
    if "embed_tokens" in case.targets:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in saved_keys(tmp_path)
    expected = output(pm, x)
    am = peftkit.AdaptedModel.from_pretrained(kit_base, tmp_path).eval()
    assert_changes(expected, base_out)
    assert_close(output(am, x), expected, "peftkit on PEFT's file")


@pytest.mark.parametrize(("case", "variant"), matrix())
@torch.no_grad()
def test_peftkit_adapter_loads_in_peft(case: Case, variant: str, tmp_path: Path) -> None:
    kit_base, peft_base = twin_bases(case)
    x = model_input(case.arch)
    base_out = output(peft_base, x)
    am = peftkit.AdaptedModel.attach(kit_base, kit_config(case, variant)).eval()
    perturb(am.adapter_state_dict("default"))
    expected = output(am, x)
    am.save_adapter(tmp_path)
    pm = peft.PeftModel.from_pretrained(peft_base, tmp_path).eval()
    assert_changes(expected, base_out)
    assert_close(output(pm, x), expected, "PEFT on peftkit's file")


# -- the same weights set directly: forward and merge -------------------------------------------------------
@pytest.mark.parametrize(("case", "variant"), matrix())
@torch.no_grad()
def test_same_weights_agree_unmerged_and_merged(case: Case, variant: str) -> None:
    """No files, so a save/load bug that mirrors a forward bug cannot hide the forward bug."""
    am, pm = paired(case, {"default": (variant, {})})
    x = model_input(case.arch)
    with pm.disable_adapter():
        base_out = output(pm, x)
    unmerged = output(pm, x)
    assert_changes(unmerged, base_out)
    assert_close(output(am, x), unmerged, "unmerged")
    pm.merge_adapter()
    merged = output(pm, x)
    if case.tied:
        # Merging into wte also changes lm_head (the same tensor), so PEFT's merged model is no longer
        # the adapted model: that is why peftkit refuses.
        assert_changes(merged, unmerged)
        with pytest.raises(peftkit.AdapterStateError, match="tied"):
            am.merge()
        assert am.merged_adapters == []
        return
    am.merge()
    assert am.merged_adapters == ["default"]
    assert_close(output(am, x), merged, "merged")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@torch.no_grad()
def test_mixed_batch_matches_peft(case: Case) -> None:
    """Two adapters (different ranks and scalings) and base rows in one batch, against PEFT's own
    mixed batch (LoRA only: PEFT refuses DoRA there)."""
    am, pm = paired(case, {"a": ("lora", {}), "b": ("rslora", {"r": 2, "lora_alpha": 3})})
    x = model_input(case.arch, batch=5)
    rows = ["a", "__base__", "b", "a", "__base__"]
    expected = output(pm, x, adapter_names=rows)
    got = output(am, x, adapter_names=rows)
    with pm.disable_adapter():
        base_out = output(pm, x)
    for i, name in enumerate(rows):
        if name != "__base__":
            assert_changes(expected[i], base_out[i])
        assert_close(got[i], expected[i], f"row {i} ({name})")


@pytest.mark.parametrize(
    ("case", "variant"),
    [(LLAMA, "lora"), (LLAMA, "dora"), (CNN, "dora")],
    ids=["llama-lora", "llama-dora", "cnn-dora"],
)
def test_training_gradients_match_peft(case: Case, variant: str) -> None:
    """In train mode (lora_dropout=0, as dropout masks cannot match), the same loss gives the same
    gradients for every A, B and DoRA magnitude."""
    am, pm = paired(case, {"default": (variant, {})})
    am.train()
    pm.train()
    x = model_input(case.arch)
    loss_kit, loss_peft = output(am, x).square().mean(), output(pm, x).square().mean()
    loss_kit.backward()
    loss_peft.backward()
    assert_close(loss_kit, loss_peft, "loss")
    ours = {peft_param_name(k, "default"): p for k, p in am.adapter_state_dict("default").items()}
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    assert sum(p.requires_grad for p in am.parameters()) == len(ours)  # nothing else trains
    # One scale for all gradients: some tensors' gradients are ~1e-3 of the largest, and their own
    # rounding noise relative to themselves says nothing about a bug.
    scale = max(scale_of(p.grad) for p in theirs.values())
    for name, p in ours.items():
        assert_close(p.grad, theirs[name].grad, f"grad of {name}", scale)


# -- the files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "variant"), matrix())
def test_saved_files_are_peft_format(case: Case, variant: str, tmp_path: Path) -> None:
    kit_base, peft_base = twin_bases(case)
    peftkit.AdaptedModel.attach(kit_base, kit_config(case, variant)).save_adapter(tmp_path / "kit")
    pm = peft.get_peft_model(peft_base, peft_config(case, variant))
    # PEFT's default also saves a targeted embedding's full base weight (save_embedding_layers), a copy
    # of the base model rather than part of the adapter: compare the adapter proper.
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=False)

    keys = saved_keys(tmp_path / "kit")
    assert keys == saved_keys(tmp_path / "peft")
    magnitudes = {k for k in keys if "magnitude" in k}
    assert bool(magnitudes) == (variant == "dora")
    assert all(k.endswith(".lora_magnitude_vector") for k in magnitudes)

    ours, theirs = peft.PeftConfig.from_pretrained(tmp_path / "kit"), pm.peft_config["default"]
    assert ours.peft_type == "LORA"
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        assert getattr(ours, key) == getattr(theirs, key), key
    # peftkit writes target_modules resolved to full module names: PEFT must adapt exactly its own layers.
    result = pm.load_adapter(tmp_path / "kit", adapter_name="kit")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".kit" in k]
    adapters = [set(getattr(m, "lora_A", {})) | set(getattr(m, "lora_embedding_A", {})) for m in pm.modules()]
    assert {"default", "kit"} in adapters
    assert all(names in (set(), {"default", "kit"}) for names in adapters)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_task_type_matches_peft(case: Case, tmp_path: Path) -> None:
    """PEFT picks its model class (PeftModelForCausalLM, ...) from task_type when loading."""
    kit_base, _ = twin_bases(case)
    peftkit.AdaptedModel.attach(kit_base, kit_config(case, "lora")).save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == TASKS[case.arch]
