"""Combining LoRA adapters (`AdaptedModel.combine`, `peftkit combine`) against HF PEFT's
`add_weighted_adapter` as the oracle, on a tiny Llama, from the same saved files.

DARE's masks are random: parity is checked with identical draws (HF PEFT draws from torch's global
generator right after it creates the new adapter, so the test reseeds it there; peftkit draws from a
generator seeded the same, in the same order), and independently by density 1 == the exact kinds
and the mask statistics at density 0.5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors.torch import load_file
from torch import Tensor, nn

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.methods.lora_combine import merge_task_tensors

peft = pytest.importorskip("peft")

# Three adapters: a and c target the same layers, b partly others; different alphas (scalings).
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
    "c": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
}
WEIGHTS = [0.7, -0.4, 1.2]
X = (torch.arange(24).view(2, 12) * 7) % VOCAB


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model directory and three HF PEFT adapters with random A and B, saved beside it."""
    return save_peft_adapters(tmp_path_factory.mktemp("combine"), ADAPTERS)


def save_peft_adapters(root: Path, adapters: dict[str, dict]) -> Path:
    """A tiny random Llama saved in root/base and one HF PEFT LoRA adapter per entry of `adapters`
    (name -> LoraConfig keys), random A and B, saved in root/NAME."""
    import peft

    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "base")
    for name, changes in adapters.items():
        pm = peft.get_peft_model(fresh_base(root), peft.LoraConfig(init_lora_weights=False, **changes))
        pm.save_pretrained(root / name)
    return root


def fresh_base(root: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "base").eval()


def hf_combine(root: Path, names: list[str], how: str, weights: list[float], seed: int | None = None, **kw):
    pm = peft.PeftModel.from_pretrained(fresh_base(root), root / names[0], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(root / n, adapter_name=n)
    if seed is not None:  # reseed after the new adapter's own (random) initialisation, before the masks
        model = pm.base_model
        inject = model.inject_adapter
        model.inject_adapter = lambda *a, **k: (inject(*a, **k), torch.manual_seed(seed))
    pm.add_weighted_adapter(names, weights, "x", combination_type=how, **kw)
    pm.set_adapter("x")
    state = peft.get_peft_model_state_dict(pm, adapter_name="x")
    return state, pm.eval()


def kit_combine(root: Path, names: list[str], how: str, weights: list[float], **kw):
    am = peftkit.AdaptedModel(fresh_base(root))
    for n in names:
        am.load_adapter(root / n, n)
    result = am.combine(names, weights, "x", how, **kw)
    am.set_adapter("x")
    return {k: v.detach() for k, v in am.adapter_state_dict("x").items()}, am.eval(), result


def logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def assert_same_factors(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-5, msg=key)


def deltas(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """B·A per layer (the combined adapters have scaling 1)."""
    return {
        k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")] @ state[k]
        for k in state
        if k.endswith("lora_A.weight")
    }


@pytest.mark.parametrize(
    ("how", "options"),
    [
        ("linear", {}),
        ("cat", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 1.0}),
        ("dare_linear", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
    ],
)
def test_factors_match_peft(saved: Path, how: str, options: dict) -> None:
    names = ["a", "b"] if how != "linear" else ["a", "c"]
    weights = WEIGHTS[: len(names)]
    theirs, pm, _ = (*hf_combine(saved, names, how, weights, **options), None)
    ours, am, result = kit_combine(saved, names, how, weights, **options)
    assert result.rank == (8 if how == "cat" else 4) and result.relative_error is None
    assert_same_factors(ours, theirs)
    torch.testing.assert_close(logits(am), logits(pm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_with_the_same_draws_matches_peft(saved: Path, how: str) -> None:
    names = ["a", "b", "c"]
    theirs, _ = hf_combine(saved, names, how, WEIGHTS, seed=7, density=0.5)
    ours, _, _ = kit_combine(saved, names, how, WEIGHTS, density=0.5, seed=7)
    assert_same_factors(ours, theirs)
    other, _, _ = kit_combine(saved, names, how, WEIGHTS, density=0.5, seed=8)
    assert any(not torch.equal(other[k], ours[k]) for k in ours)  # the seed matters


def test_dare_at_density_one_is_linear_and_ties(saved: Path) -> None:
    names = ["a", "c"]
    pairs = [("dare_linear", "linear", {}), ("dare_ties", "ties", {"density": 1.0})]
    for dare, exact, options in pairs:
        ours, _, _ = kit_combine(saved, names, dare, WEIGHTS[:2], density=1.0)
        reference, _, _ = kit_combine(saved, names, exact, WEIGHTS[:2], **options)
        assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_dare_mask_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.ones(200_000)
    kept = merge_task_tensors([t], torch.tensor([1.0]), "dare_linear", 0.5, g)
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1/density
    assert abs((kept > 0).float().mean().item() - 0.5) < 0.01
    assert abs(kept.mean().item() - 1.0) < 0.02  # the expectation is preserved
    # two tasks' masks are independent: about a quarter of the entries survive in both
    both = merge_task_tensors([t, t], torch.tensor([1.0, 1.0]), "dare_linear", 0.5, g)
    assert abs((both == 4.0).float().mean().item() - 0.25) < 0.01


def test_ties_sign_election_by_hand() -> None:
    # entry 0: +3 and -1 elect +, only +3 counts (weighted 2 -> 6); entry 1: -2 and +1 elect -, -2·2 = -4
    # over one agreeing task; entry 2: both agree, (1·2 + 1·1) / 2
    a, b = torch.tensor([3.0, -2.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0])
    merged = merge_task_tensors([a, b], torch.tensor([2.0, 1.0]), "ties", 1.0)
    assert merged.tolist() == [6.0, -4.0, 1.5]
    trimmed = merge_task_tensors([a, b], torch.tensor([1.0, 1.0]), "ties", 0.34)  # keeps one entry each
    assert trimmed.tolist() == [3.0, 0.0, 0.0]


@pytest.mark.parametrize("rank", [None, 2])
def test_svd_matches_peft_deltas_and_outputs(saved: Path, rank: int | None) -> None:
    names = ["a", "b", "c"]
    options = {"svd_rank": rank} if rank else {}
    theirs, pm = hf_combine(saved, names, "svd", WEIGHTS, **options)
    ours, am, result = kit_combine(saved, names, "svd", WEIGHTS, rank=rank)
    assert result.rank == (rank or 4)
    ours_d, theirs_d = deltas(ours), deltas(theirs)
    assert set(ours_d) == set(theirs_d)
    for key in ours_d:
        torch.testing.assert_close(ours_d[key], theirs_d[key], atol=1e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(logits(am), logits(pm), atol=1e-5, rtol=1e-4)
    # the reported error is the truncation's, against the exact weighted sum (how=cat is exact)
    exact = deltas(kit_combine(saved, names, "cat", WEIGHTS)[0])
    err = sum((ours_d[k] - exact[k]).square().sum() for k in exact) ** 0.5
    norm = sum(exact[k].square().sum() for k in exact) ** 0.5
    assert result.relative_error == pytest.approx((err / norm).item(), rel=1e-3, abs=1e-6)
    assert result.relative_error > 1e-3 and result.worst_layer is not None


def test_svd_at_full_rank_is_exact(saved: Path) -> None:
    # (HF PEFT is no oracle here: above a layer's smaller dimension its factors come out misshapen)
    names = ["a", "b", "c"]
    ours, _, result = kit_combine(saved, names, "svd", WEIGHTS, rank=12)
    exact = deltas(kit_combine(saved, names, "cat", WEIGHTS)[0])
    assert result.relative_error < 1e-6 and ours[next(iter(ours))].shape[0] == 12
    for key, delta in deltas(ours).items():
        torch.testing.assert_close(delta, exact[key], atol=1e-5, rtol=1e-4)


def test_saved_combination_loads_in_peft_and_cli_agrees(saved: Path, tmp_path: Path, capsys) -> None:
    names = ["a", "b", "c"]
    dirs = [str(saved / n) for n in names]
    args = [
        "--weights",
        *map(str, WEIGHTS),
        "--how",
        "ties",
        "--density",
        "0.5",
        "--base",
        str(saved / "base"),
    ]
    assert main(["combine", str(tmp_path / "cli"), "--adapters", *dirs, *args]) == 0
    assert "LoRA r=4 on 6 layers (ties)" in capsys.readouterr().out
    ours, am, _ = kit_combine(saved, names, "ties", WEIGHTS, density=0.5)
    loaded = peft.PeftModel.from_pretrained(fresh_base(saved), tmp_path / "cli").eval()
    torch.testing.assert_close(logits(loaded), logits(am), atol=1e-6, rtol=1e-6)
    # without --base, the base recorded in the first adapter (HF PEFT saved its directory)
    svd = [*dirs, "--weights", "1", "1", "1", "--rank", "2"]
    assert main(["combine", str(tmp_path / "svd"), "--adapters", *svd]) == 0
    assert "relative reconstruction error of the delta" in capsys.readouterr().out


def test_bad_requests_are_refused(saved: Path) -> None:
    am = peftkit.AdaptedModel(fresh_base(saved))
    for n in ADAPTERS:
        am.load_adapter(saved / n, n)
    am.add_adapter("r8", peftkit.LoraConfig(r=8, target_modules=["q_proj"]))
    am.add_adapter("dora", peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    am.add_adapter("ia3", peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    cases = [
        ((["a", "b"], [1.0], "x", "linear"), {}, "2 adapter"),
        ((["a", "b"], [1.0, 1.0], "x", "ties"), {}, "needs density in (0, 1]"),
        ((["a", "b"], [1.0, 1.0], "x", "ties"), {"density": 0.0}, "needs density in (0, 1]"),
        ((["a", "b"], [1.0, 1.0], "x", "dare_ties"), {"density": 1.5}, "needs density in (0, 1]"),
        ((["a", "b"], [1.0, 1.0], "x", "linear"), {"density": 0.5}, "density applies to"),
        ((["a", "b"], [1.0, 1.0], "x", "svd"), {"rank": 0}, "positive integer"),
        ((["a", "b"], [1.0, 1.0], "x", "cat"), {"rank": 2}, "rank applies to how=svd only"),
        ((["a", "r8"], [1.0, 1.0], "x", "linear"), {}, "need one rank"),
        ((["a", "ia3"], [1.0, 1.0], "x", "cat"), {}, "LoRA adapters only"),
        ((["a", "dora"], [1.0, 1.0], "x", "cat"), {}, "DoRA"),
        ((["a", "b"], [1.0, 1.0], "a", "cat"), {}, "is taken"),
        ((["a", "zzz"], [1.0, 1.0], "x", "cat"), {}, "no adapter named 'zzz'"),
        ((["a", "b"], [1.0, 1.0], "x", "mean"), {}, "not a way to combine"),
    ]
    before = am.adapters
    for args, options, message in cases:
        with pytest.raises(PeftkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
            am.combine(*args, **options)
        assert am.adapters == before  # a refusal changes nothing


def test_cli_refuses_other_bases_and_other_methods(tmp_path: Path, capsys) -> None:
    torch.manual_seed(1)
    for i in range(2):  # two different random bases, adapters saved by peftkit (fingerprints recorded)
        am = peftkit.AdaptedModel.attach(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
        am.save_adapter(tmp_path / f"lora{i}")
    ia3 = peftkit.AdaptedModel.attach(
        tiny_llama(), peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    )
    ia3.save_adapter(tmp_path / "ia3")
    base = ["--base", str(tmp_path)]  # never loaded: the files are refused first
    cases = [  # (OUT, adapters, what the error says)
        ("o", ["lora0", "lora1"], "different base models"),
        ("o", ["lora0", "ia3"], "LoRA adapters only"),
        ("lora0", ["lora0"], "choose a directory of its own"),
    ]
    for out, names, message in cases:
        args = ["combine", str(tmp_path / out), "--adapters", *(str(tmp_path / n) for n in names)]
        assert main([*args, "--weights", *["1"] * len(names), *base]) == 2
        assert message in capsys.readouterr().err
    # Onto another base: refused with the way through, which combine has
    tiny_llama().save_pretrained(tmp_path / "other")
    args = [
        "combine",
        str(tmp_path / "o"),
        "--adapters",
        str(tmp_path / "lora0"),
        "--base",
        str(tmp_path / "other"),
    ]
    assert main(args) == 2
    assert "--no-check-base" in capsys.readouterr().err
    assert main([*args, "--no-check-base"]) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_weights_default_to_one_each(saved: Path, tmp_path: Path, capsys) -> None:
    """`combine --weights` was shown as `(default: [])` yet required; unset, each adapter weighs 1."""
    dirs = [str(saved / n) for n in ("a", "b")]
    assert main(["combine", str(tmp_path / "cat"), "--adapters", *dirs, "--how", "cat"]) == 0, (
        capsys.readouterr()
    )
    explicit = tmp_path / "explicit"
    assert main(["combine", str(explicit), "--adapters", *dirs, "--how", "cat", "--weights", "1", "1"]) == 0
    ours, theirs = (
        load_file(tmp_path / "cat" / "adapter_model.safetensors"),
        load_file(explicit / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_ranks_are_checked_from_the_files_before_the_weights_and_the_base(tmp_path: Path, capsys) -> None:
    """Adapters of two ranks cannot be merged entry by entry: said from the files, before a wrong
    weight count and before the (missing, so never loaded) base."""
    for name, r in (("r2", 2), ("r4", 4)):
        am = peftkit.AdaptedModel.attach(tiny_llama(), peftkit.LoraConfig(r=r, target_modules=["q_proj"]))
        am.save_adapter(tmp_path / name)
    args = ["combine", str(tmp_path / "o"), "--adapters", str(tmp_path / "r2"), str(tmp_path / "r4")]
    assert main([*args, "--how", "linear", "--weights", "1", "--base", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "need one rank" in err and "how=cat" in err, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    args = [
        "combine",
        str(tmp_path / "mine"),
        "--adapters",
        str(tmp_path / "r2"),
        "--base",
        str(tmp_path / "nope"),
    ]
    assert main(args) == 2  # one output-directory rule: new, empty or an adapter's; refused before any load
    assert "holds other files (notes.txt) and no adapter" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import re
    import shlex

    from peftkit.cli import build_parser

    text = (Path(__file__).parents[1] / "docs/combine.md").read_text()
    monkeypatch.chdir(tmp_path)
    (block,) = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    exec(compile(block, "docs/combine.md", "exec"), {"__name__": "docs"})
    assert "relative error" in capsys.readouterr().out
    assert (tmp_path / "out/combined/adapter_model.safetensors").is_file()
    (bash,) = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    for line in bash.strip().splitlines():
        build_parser().parse_args(shlex.split(line)[1:])
