"""`peftkit compress`: SVD rank reduction of LoRA adapters, checked from the files it writes.

The oracle for the math is ΔW = s·B·A computed here from the files (the scaling read from
adapter_config.json by this module's own few lines, HF PEFT's pattern rule included); the oracle for the
format is HF PEFT loading the output onto the same tiny base and giving peftkit's logits.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

import peftkit
from peftkit.cli import build_parser, main
from peftkit.errors import PeftkitError
from peftkit.methods.lora_compress import compress_layer, kept_rank
from peftkit.tools.compress import compress_adapter

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notes on tied weights and the like

X = (torch.arange(24).view(2, 12) * 7) % VOCAB
TARGETS = ("embed_tokens", "q_proj", "v_proj", "down_proj")  # an embedding and three linear layers
FACTORS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


# -- setup ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama in root/base and adapters for it: `lora` (peftkit, r=8, an lm_head copy in
    modules_to_save), `rslora` (peftkit), `patterns` (HF PEFT, rsLoRA with rank_pattern and
    alpha_pattern) and `deficient` (peftkit, r=8 whose every B·A has rank 3)."""
    root = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "base")
    lora = dict(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    kit_adapter(root, "lora", peftkit.LoraConfig(**lora, modules_to_save=("lm_head",)))
    kit_adapter(root, "rslora", peftkit.LoraConfig(**{**lora, "lora_alpha": 4}, use_rslora=True))
    patterns = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"v_proj": 3.0},
        init_lora_weights=False,
    )
    peft.get_peft_model(fresh_base(root), patterns).save_pretrained(root / "patterns")
    am = peftkit.AdaptedModel.attach(fresh_base(root), peftkit.LoraConfig(**lora))
    with torch.no_grad():
        for _, layer in am.adapter_layers():  # B = (out, 3)·(3, 8): rank 3, up to float32 rounding
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape[0], 3) @ torch.randn(3, b.shape[1]))
    am.save_adapter(root / "deficient")
    return root


def fresh_base(root: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "base").eval()


def kit_adapter(root: Path, name: str, config: peftkit.LoraConfig, into: Path | None = None) -> Path:
    """A peftkit adapter on root's base, saved as (into or root)/name."""
    path = (into or root) / name
    peftkit.AdaptedModel.attach(fresh_base(root), config).save_adapter(path)
    return path


def kit_logits(root: Path, adapter: Path) -> Tensor:
    am = peftkit.AdaptedModel(fresh_base(root))
    am.load_adapter(adapter, "x")
    with torch.no_grad():
        return am(input_ids=X).logits


def peft_logits(root: Path, adapter: Path) -> Tensor:
    model = peft.PeftModel.from_pretrained(fresh_base(root), adapter).eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def scaling(config: dict, module: str) -> float:
    """A layer's scaling as HF PEFT derives it: the first rank_pattern / alpha_pattern key that matches
    a dotted suffix of the module path, then alpha / r (alpha / √r for rsLoRA)."""

    def pick(patterns: dict, default: float) -> float:
        return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)

    r = pick(config.get("rank_pattern") or {}, config["r"])
    alpha = pick(config.get("alpha_pattern") or {}, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def deltas(directory: Path) -> dict[str, Tensor]:
    """Each layer's ΔW = s·B·A (float64) from the adapter's files."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        for a_suffix, b_suffix in FACTORS:
            if key.endswith("." + a_suffix):
                module = key.removeprefix("base_model.model.").removesuffix("." + a_suffix)
                b = tensors[key.removesuffix(a_suffix) + b_suffix]
                out[module] = scaling(config, module) * (b.double() @ a.double())
    return out


def ranks(directory: Path) -> dict[str, int]:
    """Each layer's rank as stored (dimension 0 of its A factor)."""
    tensors = load_file(directory / "adapter_model.safetensors")
    return {k: t.shape[0] for k, t in tensors.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))}


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the math ---------------------------------------------------------------------------------------
def test_energy_picks_the_fewest_singular_values_that_reach_it() -> None:
    """Singular values 4, 3, 2, 1 (squares 16, 9, 4, 1 of 30): 0.5 needs one, 0.8 two, 0.84 three."""
    u, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    b, a = u * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), v.T  # (12, 4), (4, 10)
    for energy, k in ((0.5, 1), (0.8, 2), (0.84, 3), (30 / 30, 4)):
        layer = compress_layer(a, b, 1.0, energy=energy)
        assert layer.kept == k, energy
        dropped = sum(s * s for s in (4.0, 3.0, 2.0, 1.0)[k:])
        assert layer.relative_error == pytest.approx(math.sqrt(dropped / 30), abs=1e-12)
        assert relative(layer.b @ layer.a, b @ a) == pytest.approx(layer.relative_error, abs=1e-12)
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), (12, 10), rank=9) == 4  # never above the rank


def test_convolution_factors_keep_their_shapes_and_a_zero_update_keeps_one_rank_of_zeros() -> None:
    a, b = (
        torch.randn(4, 3, 3, 3),
        torch.randn(6, 4, 1, 1),
    )  # a Conv2d LoRA: A (r, C, kh, kw), B (out, r, 1, 1)
    layer = compress_layer(a, b, 2.0, rank=3)
    assert layer.a.shape == (3, 3, 3, 3) and layer.b.shape == (6, 3, 1, 1)
    full = 2.0 * b.reshape(6, 4).double() @ a.reshape(4, -1).double()
    measured = relative(layer.b.reshape(6, 3) @ layer.a.reshape(3, -1), full)
    assert measured == pytest.approx(layer.relative_error, abs=1e-12) and layer.relative_error > 0.01
    zero = compress_layer(a, torch.zeros_like(b), 2.0, energy=1.0)
    assert (zero.kept, zero.rank, zero.relative_error) == (0, 1, 0.0)
    assert not zero.a.any() and not zero.b.any()


# -- the files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lora", "rslora", "patterns"])
def test_energy_one_keeps_every_update(saved: Path, tmp_path: Path, name: str) -> None:
    """Plain LoRA, rsLoRA and rank/alpha patterns: at energy 1.0 every layer's s·B·A is the same."""
    result = compress_adapter(saved / name, tmp_path / "out", energy=1.0)
    before, after = deltas(saved / name), deltas(tmp_path / "out")
    assert before.keys() == after.keys() and len(before) == len(result.rows)
    for module, delta in before.items():
        assert relative(after[module], delta) < 1e-5, module
    assert result.relative_error < 1e-6
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]


@pytest.mark.parametrize("name", ["lora", "patterns"])
def test_peft_loads_the_output_and_gives_peftkits_logits(saved: Path, tmp_path: Path, name: str) -> None:
    """At energy 0.8 the layers keep different ranks (rank_pattern in use): HF PEFT and peftkit agree on
    the output; at 1.0 both also give the original adapter's logits."""
    original = kit_logits(saved, saved / name)
    for energy in (0.8, 1.0):
        out = tmp_path / f"e{energy}"
        compress_adapter(saved / name, out, energy=energy)
        ours, theirs = kit_logits(saved, out), peft_logits(saved, out)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        if energy == 1.0:
            torch.testing.assert_close(ours, original, atol=1e-5, rtol=1e-5)
        else:
            assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
            assert (ours - original).abs().max() > 1e-3  # a truncation the comparison would notice


@pytest.mark.parametrize("target", [{"energy": 0.8}, {"rank": 2}])
def test_ranks_and_updates_match_peft_convert_to_lora(saved: Path, tmp_path: Path, target: dict) -> None:
    """HF PEFT's own LoRA-to-LoRA conversion (`convert_to_lora`, an int rank or a float energy, linear
    layers only) on the loaded model picks the same rank per layer and gives the same updates."""
    result = compress_adapter(saved / "patterns", tmp_path / "out", **target)
    model = peft.PeftModel.from_pretrained(fresh_base(saved), saved / "patterns")
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        config, state = peft.convert_to_lora(model, rank=target.get("energy", target.get("rank")))
    theirs = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            theirs[module] = scaling(config.to_dict(), module) * (b.double() @ a.double())
            assert a.shape[0] == next(r.rank_after for r in result.rows if r.module == module), module
    ours = deltas(tmp_path / "out")
    assert ours.keys() == theirs.keys()
    for module, delta in ours.items():
        assert relative(delta, theirs[module]) < 1e-5, module


def test_a_rank_deficient_adapter_compresses_to_its_true_rank(saved: Path, tmp_path: Path) -> None:
    result = compress_adapter(saved / "deficient", tmp_path / "out", energy=1.0)
    assert set(ranks(tmp_path / "out").values()) == {3} and result.r == 3
    assert all((row.rank_before, row.rank_after) == (8, 3) for row in result.rows)
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (3, 3, {})
    before, after = deltas(saved / "deficient"), deltas(tmp_path / "out")
    for module, delta in before.items():
        assert relative(after[module], delta) < 1e-5, module


def test_rank_two_reports_the_error_measured_from_the_files(saved: Path, tmp_path: Path) -> None:
    result = compress_adapter(saved / "lora", tmp_path / "out", rank=2)
    assert set(ranks(tmp_path / "out").values()) == {2} and result.r == 2
    before, after = deltas(saved / "lora"), deltas(tmp_path / "out")
    for row in result.rows:
        measured = relative(after[row.module], before[row.module])
        assert row.relative_error == pytest.approx(measured, abs=1e-5) and measured > 0.05, row.module
    error_sq = sum(float((after[m] - before[m]).square().sum()) for m in before)
    overall = math.sqrt(error_sq / sum(float(d.square().sum()) for d in before.values()))
    assert result.relative_error == pytest.approx(overall, abs=1e-5)
    stored = load_file(tmp_path / "out/adapter_model.safetensors")
    lora_keys = [k for k in stored if ".lora_" in k]
    assert result.total("params_after") == sum(stored[k].numel() for k in lora_keys)
    assert result.total("bytes_after") == 4 * result.total("params_after")  # float32 in, float32 out


def test_an_all_zero_adapter_keeps_one_rank_of_zeros_and_loads(saved: Path, tmp_path: Path) -> None:
    zero = kit_adapter(saved, "zero", peftkit.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)  # B = 0
    result = compress_adapter(zero, tmp_path / "out", rank=2)
    assert set(ranks(tmp_path / "out").values()) == {1} and result.relative_error == 0.0
    torch.testing.assert_close(kit_logits(saved, tmp_path / "out"), kit_logits(saved, zero))


def test_bf16_output_keeps_everything_else(saved: Path, tmp_path: Path) -> None:
    """--dtype bf16 stores the new factors in bf16; the lm_head copy, the metadata (peftkit's base
    fingerprint) and the other config keys are the input's."""
    compress_adapter(saved / "lora", tmp_path / "out", energy=0.9, dtype="bf16")
    old, new = (
        load_file(saved / "lora/adapter_model.safetensors"),
        load_file(tmp_path / "out/adapter_model.safetensors"),
    )
    assert old.keys() == new.keys()
    for key, tensor in new.items():
        if ".lora_" in key:
            assert tensor.dtype == torch.bfloat16, key
        else:  # the modules_to_save copy
            assert "lm_head" in key and torch.equal(tensor, old[key])
    metadata = [
        safe_open(d / "adapter_model.safetensors", "pt").metadata()
        for d in (saved / "lora", tmp_path / "out")
    ]
    assert metadata[0] == metadata[1] and "peftkit_base_fingerprint" in metadata[0]
    configs = [
        json.loads((d / "adapter_config.json").read_text()) for d in (saved / "lora", tmp_path / "out")
    ]
    changed = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"}
    assert {k: v for k, v in configs[0].items() if k not in changed} == {
        k: v for k, v in configs[1].items() if k not in changed
    }
    torch.testing.assert_close(kit_logits(saved, tmp_path / "out"), peft_logits(saved, tmp_path / "out"))


# -- refusals and the command line ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def others(saved: Path) -> Path:
    """Beside the LoRA adapters: an IA³ and a DoRA adapter of the same base."""
    ia3 = peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    peftkit.AdaptedModel.attach(fresh_base(saved), ia3).save_adapter(saved / "ia3")
    kit_adapter(saved, "dora", peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    return saved


@pytest.mark.parametrize(
    ("adapter", "out", "options", "message"),
    [
        ("lora", "new", {"rank": 2, "energy": 0.5}, "one target, both given"),
        ("lora", "new", {}, "one target, neither given"),
        ("lora", "new", {"rank": 0}, "--rank must be a positive integer, got 0"),
        ("lora", "new", {"energy": 0.0}, "--energy must be a number in (0, 1]"),
        ("lora", "new", {"energy": 1.5}, "--energy must be a number in (0, 1]"),
        ("lora", "new", {"rank": 2, "dtype": "fp8"}, "dtype 'fp8' is not one compress stores"),
        ("ia3", "new", {"rank": 2}, "IA³, prompt, prefix and bottleneck adapters are not low-rank"),
        ("dora", "new", {"rank": 2}, "is a DoRA adapter: its magnitude vector"),
        ("nope", "new", {"rank": 2}, "adapter directory not found"),
        ("lora", "lora", {"rank": 2}, "is the adapter directory"),
        ("lora", "lora/inner", {"rank": 2}, "is inside the adapter directory"),
        ("lora", ".", {"rank": 2}, "contains the adapter directory"),
        ("lora", "rslora", {"rank": 2}, "already holds an adapter; pass --overwrite"),
        ("lora", "base", {"rank": 2, "overwrite": True}, "holds other files"),
    ],
)
def test_refusals_name_the_problem(others: Path, adapter: str, out: str, options: dict, message: str) -> None:
    before = {p: p.stat().st_mtime_ns for p in others.rglob("*")}
    with pytest.raises(PeftkitError) as caught:
        compress_adapter(others / adapter, others / out, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert {p: p.stat().st_mtime_ns for p in others.rglob("*")} == before  # nothing written
    assert not (others / "new").exists()


def test_overwrite_replaces_an_adapter(saved: Path, tmp_path: Path) -> None:
    compress_adapter(saved / "lora", tmp_path / "out", rank=4)
    compress_adapter(saved / "lora", tmp_path / "out", rank=2, overwrite=True)
    assert set(ranks(tmp_path / "out").values()) == {2}


def test_the_command_prints_the_table_and_json(saved: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["compress", str(saved / "lora"), str(tmp_path / "out"), "--rank", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["module", "rank", "params", "bytes", "rel.", "error"]
    row = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj "))
    assert row.split()[1:4] == ["8", "->", "2"] and "256 -> 64" in row and "1,024 -> 256" in row
    total = next(line for line in lines if line.startswith("total:"))
    assert (
        "r 8 -> 2 on 7 layers (rank 2)" in total and "(75.0% fewer)" in total and "(75.0% smaller)" in total
    )
    assert re.search(r"relative error 0\.\d+ \(‖ΔW − ΔW'‖ / ‖ΔW‖ over all layers\)", total), total
    assert "copied unchanged" in lines[-2] and lines[-1] == f"wrote {tmp_path / 'out'}: LoRA r=2 on 7 layers"
    args = [
        "compress",
        str(saved / "lora"),
        str(tmp_path / "out"),
        "--energy",
        "1.0",
        "--overwrite",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["r"] == 8 and result["relative_error"] < 1e-6 and len(result["layers"]) == 7
    assert main(["compress", str(saved / "lora"), str(tmp_path / "o2"), "--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --rank must be a positive integer, got 0\n" and not (tmp_path / "o2").exists()


def test_a_registry_reference_names_the_adapter(saved: Path, tmp_path: Path, capsys) -> None:
    registry = str(tmp_path / "registry")
    assert main(["registry", "register", "mine", str(saved / "lora"), "--registry", registry]) == 0
    result = compress_adapter("mine@1", tmp_path / "out", rank=3, registry=registry)
    assert set(ranks(tmp_path / "out").values()) == {3} and len(result.rows) == 7


def test_the_docs_commands_parse_and_show_todays_report(saved: Path, tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "docs/compress.md").read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    commands = [line for kind, body in blocks if kind == "bash" for line in body.splitlines() if line.strip()]
    assert commands and all(line.startswith("peftkit compress ") for line in commands)
    for line in commands:
        build_parser().parse_args(shlex.split(line)[1:])
    (shown,) = [body.splitlines() for kind, body in blocks if kind == "" and body.startswith("module")]
    table = compress_adapter(saved / "lora", tmp_path / "out", energy=0.95).table().splitlines()
    assert shown[0].split() == table[0].split()
    numbers = re.compile(r"\d[\d,.]*")  # the docs show another adapter's numbers, in today's words
    total = next(line for line in table if line.startswith("total:"))
    assert numbers.sub("N", total) in {numbers.sub("N", line) for line in shown}
