"""Weighted adapter sets at inference (`set_adapter({name: weight})`, weighted rows in `adapter_names`):
against `combine(..., how="cat")` with the same weights, against HF PEFT's several active adapters at
weight 1 (from the same saved files), and row by row against the same set activated alone."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, model_input, output, tiny_llama
from test_combine import fresh_base, save_peft_adapters
from test_errors import raises
from torch import Tensor, nn

from peftkit import AdaptedModel, BottleneckConfig, IA3Config, LoraConfig, PromptTuningConfig
from peftkit.cli import main
from peftkit.errors import AdapterNotFoundError, AdapterStateError, RequestError

peft = pytest.importorskip("peft")

# Two adapters on partly different layers, with different scalings (one rsLoRA).
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_rslora=True),
}
X = (torch.arange(24).view(2, 12) * 7) % VOCAB


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model directory and two HF PEFT adapters with random A and B, saved beside it."""
    return save_peft_adapters(tmp_path_factory.mktemp("weighted"), ADAPTERS)


def loaded(root: Path) -> AdaptedModel:
    am = AdaptedModel(fresh_base(root))
    for name in ADAPTERS:
        am.load_adapter(root / name, name)
    return am.eval()


def logits(model: nn.Module, x: Tensor = X, **kwargs) -> Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def alone(am: AdaptedModel, x: Tensor, choice) -> Tensor:
    """The output of `x` with `choice` (a name, a {name: weight} mapping, None) activated for the model."""
    if choice is None:
        with am.disable_adapters():
            return output(am, x)
    am.set_adapter(choice)
    return output(am, x)


# -- the whole model: set_adapter({name: weight}) ----------------------------------------------------
@pytest.mark.parametrize("weights", [(0.7, -0.4), (1.0, 1.0), (0.0, 2.5)])
def test_weighted_activation_equals_the_cat_combination(saved: Path, weights: tuple[float, float]) -> None:
    am = loaded(saved)
    am.set_adapter(dict(zip(ADAPTERS, weights)))
    ours = logits(am)
    combined = loaded(saved)
    combined.combine(list(ADAPTERS), list(weights), "x", how="cat")
    combined.set_adapter("x")
    torch.testing.assert_close(ours, logits(combined), atol=1e-5, rtol=1e-5)
    am.set_adapter(list(ADAPTERS))
    assert (ours - logits(am)).abs().max() > 1e-3 or weights == (1.0, 1.0)  # the weights did something


def test_weights_of_one_equal_peft_with_both_adapters_active(saved: Path) -> None:
    pm = peft.PeftModel.from_pretrained(fresh_base(saved), saved / "a", adapter_name="a")
    pm.load_adapter(saved / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    am = loaded(saved)
    am.set_adapter({"a": 1, "b": 1.0})
    assert am.active_adapters == ["a", "b"] and am.active_weights == {"a": 1.0, "b": 1.0}
    torch.testing.assert_close(logits(am), logits(pm.eval()), atol=1e-5, rtol=1e-5)
    am.set_adapter("a")
    assert (logits(am) - logits(pm)).abs().max() > 1e-3


def test_weights_are_reported_and_reset(saved: Path) -> None:
    am = loaded(saved)
    am.set_adapter({"a": 0.0, "b": -1})
    assert am.active_adapters == ["a", "b"] and am.active_weights == {"a": 0.0, "b": -1.0}
    zero_a = logits(am)
    am.set_adapter("b")
    assert am.active_weights == {"b": 1.0}  # activated by name: weight 1 again
    plus_b = logits(am)
    am.set_adapter({"b": -1})
    minus_b = logits(am)
    torch.testing.assert_close(zero_a, minus_b)  # weight 0 adds nothing
    with am.disable_adapters():
        base = logits(am)
    assert (minus_b - base).abs().max() > 1e-3 and (minus_b - plus_b).abs().max() > 1e-3
    am.set_adapter({"b": 0.5})
    am.delete_adapter("b")
    am.load_adapter(saved / "b", "b")
    am.set_adapter(["a", "b"])
    assert am.active_weights == {"a": 1.0, "b": 1.0}  # a deleted adapter's weight went with it


# -- mixed batches: a weighted set per row --------------------------------------------------------------
ROWS = [{"a": 0.7, "b": 0.3}, "a", None, {"b": -1}]


@pytest.mark.parametrize(
    "kind, targets",
    [
        ("llama", ["q_proj", "v_proj", "embed_tokens"]),  # linear and embedding
        ("gpt2", ["c_attn"]),  # transformers' Conv1D
        ("cnn", ["conv1", "seq", "fc1"]),  # conv2d, conv1d, linear
    ],
)
def test_mixed_batch_rows_equal_each_set_run_alone(kind: str, targets: list[str]) -> None:
    from conftest import MODELS

    am = AdaptedModel.attach(
        MODELS[kind](), LoraConfig(r=4, target_modules=targets, init_lora_weights=False), "a"
    )
    am.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=targets[:1], init_lora_weights=False))
    x = model_input(kind, batch=len(ROWS))
    with torch.no_grad():
        mixed = output(am, x, adapter_names=ROWS)
        for i, choice in enumerate(ROWS):
            torch.testing.assert_close(mixed[i], alone(am, x[i : i + 1], choice)[0], atol=1e-6, rtol=1e-5)
        assert (mixed[0] - alone(am, x[:1], "a")[0]).abs().max() > 1e-4  # the weighted row is its own


def test_a_dora_row_beside_weighted_rows(saved: Path) -> None:
    am = loaded(saved)
    am.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        am.get_submodule("model.model.layers.0.self_attn.q_proj").lora_magnitude["d"].mul_(1.5)
    rows = [{"a": 0.5, "b": 0.5}, "d", None]
    x = torch.cat([X, X[:1]])
    mixed = logits(am, x, adapter_names=rows)
    for i, choice in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(am, x[i : i + 1], choice)[0], atol=1e-5, rtol=1e-5)


def test_plain_rows_keep_the_one_slot_path(saved: Path) -> None:
    am = loaded(saved)
    seen = []
    with am.mixed_batch([{"a": 1}, "b", None]):  # {a: 1} is the plain name
        seen.append(am.state.rows)
    with am.mixed_batch([{"a": 1, "b": 1}, None]):
        seen.append(am.state.rows)
    plain, weighted = seen
    assert plain.weights is None and plain.names == ("a", "b", None)
    assert weighted.weights.tolist() == [[1.0, 1.0], [0.0, 0.0]] and weighted.names == (None, None)


def test_generate_with_a_weighted_row_matches_the_set_activated(saved: Path) -> None:
    am = loaded(saved)
    x = torch.cat([X, X])[:3, :6]
    rows = [{"a": 2.0, "b": -1.5}, None, "b"]
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    for extra in ({}, {"num_beams": 2}):
        mixed = am.generate(input_ids=x, adapter_names=rows, **kwargs, **extra)
        singles = [
            am_generate(am, x[i : i + 1], choice, **kwargs, **extra)[0] for i, choice in enumerate(rows)
        ]
        for i, single in enumerate(singles):
            assert torch.equal(mixed[i], single), (extra, i)
        assert not torch.equal(singles[0], singles[1])  # the weighted set changes the greedy tokens
    per_beam = [r for r in rows for _ in range(2)]  # names given per beam: each row's beams share its set
    assert torch.equal(am.generate(input_ids=x, adapter_names=per_beam, num_beams=2, **kwargs), mixed)


def am_generate(am: AdaptedModel, x: Tensor, choice, **kwargs) -> Tensor:
    if choice is None:
        with am.disable_adapters():
            return am.generate(input_ids=x, **kwargs)
    am.set_adapter(choice)
    return am.generate(input_ids=x, **kwargs)


# -- merging ----------------------------------------------------------------------------------------
def test_merge_folds_the_weights_in_and_unmerge_is_exact(saved: Path) -> None:
    am = loaded(saved)
    before = {k: v.clone() for k, v in am.base_tensors()}
    am.set_adapter({"a": 0.7, "b": -0.4})
    weighted = logits(am)
    am.merge()
    torch.testing.assert_close(logits(am), weighted, atol=1e-5, rtol=1e-5)
    merged = {k: v.clone() for k, v in am.model.state_dict().items()}
    am.merge()  # idempotent
    assert all(torch.equal(v, merged[k]) for k, v in am.model.state_dict().items())
    with raises(AdapterStateError, "merged", "unmerge() before"):
        am.set_adapter({"a": 0.5, "b": 1})
    torch.testing.assert_close(logits(am), weighted, atol=1e-5, rtol=1e-5)  # the refusal changed nothing
    am.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in am.base_tensors())
    torch.testing.assert_close(logits(am), weighted)
    plain = loaded(saved)
    plain.set_adapter({"a": 0.7, "b": -0.4})
    torch.testing.assert_close(logits(plain.merge_and_unload()), weighted, atol=1e-5, rtol=1e-5)


def test_a_merged_adapter_keeps_the_weight_it_was_merged_with(saved: Path) -> None:
    """While an adapter is merged, set_adapter may not give it another weight (a plain name means 1):
    `active_weights` would contradict the output, and a later merge() + unmerge() would change it."""
    am = loaded(saved)
    am.set_adapter("a")
    at_one = logits(am)
    am.set_adapter({"a": 0.5})
    half = logits(am)
    am.merge()
    for choice in ({"a": 1}, "a", ["b", "a"], {"b": 0.3, "a": 0.7}):
        with raises(AdapterStateError, "'a' is merged", "weight 0.5", "unmerge() before"):
            am.set_adapter(choice)
        assert am.active_weights == {"a": 0.5}  # the refusal changed nothing
    am.set_adapter({"a": 0.5})  # the weight it was merged with
    am.merge()
    am.unmerge()
    torch.testing.assert_close(logits(am), half)
    # Only the adapters asked for count: b merged at 1 does not stop a from taking a weight.
    am.set_adapter("b")
    am.merge()
    am.set_adapter({"b": 1, "a": 0.5})
    assert am.active_weights == {"b": 1.0, "a": 0.5}
    am.unmerge()
    am.set_adapter("a")
    torch.testing.assert_close(logits(am), at_one)


def test_beams_may_give_one_weighted_set_in_any_key_order(saved: Path) -> None:
    am = loaded(saved)
    x = X[:1]
    kwargs = dict(num_beams=2, max_new_tokens=3, do_sample=False, pad_token_id=0)
    per_beam = am.generate(input_ids=x, adapter_names=[{"a": 0.7, "b": 0.3}, {"b": 0.3, "a": 0.7}], **kwargs)
    per_row = am.generate(input_ids=x, adapter_names=[{"a": 0.7, "b": 0.3}], **kwargs)
    assert torch.equal(per_beam, per_row)


# -- refusals -----------------------------------------------------------------------------------------
@pytest.fixture
def every_method() -> AdaptedModel:
    am = AdaptedModel.attach(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a"
    )
    am.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    am.add_adapter("i", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    am.add_adapter("n", BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4))
    am.add_adapter("m", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    am.add_adapter("bias", LoraConfig(r=2, target_modules=["v_proj"], bias="all"))
    return am


@pytest.mark.parametrize(
    "choice, error, fragments",
    [
        (
            {"d": 0.5},
            RequestError,
            ["'d' cannot take weight 0.5", "DoRA", "renormalises", "set_adapter('d')"],
        ),
        (
            {"a": 0.5, "i": 2},
            RequestError,
            ["'i' cannot take weight 2", "IA³", "rescales", "peftkit combine"],
        ),
        ({"p": -1}, RequestError, ["'p'", "prompt tuning", "soft-token", "weight 1"]),
        ({"n": 0.5}, RequestError, ["'n'", "Bottleneck", "weight 1"]),
        ({"m": 0.5}, RequestError, ["'m'", "modules_to_save"]),
        ({"bias": 0.5}, RequestError, ["'bias'", "bias='all'"]),
        ({"a": math.nan}, RequestError, ["weight of adapter 'a' is nan", "finite"]),
        ({"a": -math.inf}, RequestError, ["is -inf", "finite"]),
        ({"a": True}, RequestError, ["is True", "a weight is a number"]),
        ({"a": "0.5"}, RequestError, ["is '0.5'", "a weight is a number"]),
        ({"a": torch.tensor(True)}, RequestError, ["is tensor(True)", "a weight is a number"]),
        ({"a": torch.tensor([0.5, 1])}, RequestError, ["a weight is a number"]),
        ({"a": torch.tensor(math.nan)}, RequestError, ["weight of adapter 'a' is nan", "finite"]),
        ({"a": np.float32(math.inf)}, RequestError, ["weight of adapter 'a' is inf", "finite"]),
        ({"a": np.bool_(True)}, RequestError, ["a weight is a number"]),
        ({"a": 0.5, "nope": 1}, AdapterNotFoundError, ["no adapter named 'nope'", "attached adapters"]),
        ({}, RequestError, ["empty {name: weight} mapping", "disable_adapters"]),
        ({3: 0.5}, RequestError, ["3 in a {name: weight} mapping is no adapter name"]),
    ],
)
def test_set_adapter_refusals(every_method: AdaptedModel, choice, error, fragments: list[str]) -> None:
    am = every_method
    am.set_adapter(["a", "i"])
    with raises(error, *fragments):
        am.set_adapter(choice)
    assert am.active_adapters == ["a", "i"] and am.active_weights == {"a": 1.0, "i": 1.0}  # unchanged


@pytest.mark.parametrize(
    "weight", [torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), np.float32(0.5)]
)
def test_tensor_and_numpy_scalars_are_weights(saved: Path, weight) -> None:
    am = loaded(saved)
    am.set_adapter({"a": 0.5})
    expected = logits(am)
    am.set_adapter({"a": weight})
    assert am.active_weights == {"a": 0.5} and type(am.active_weights["a"]) is float
    torch.testing.assert_close(logits(am), expected)
    torch.testing.assert_close(logits(am, adapter_names=[{"a": weight}, {"a": 0.5}]), logits(am, X))


def test_weight_one_works_for_every_method(every_method: AdaptedModel) -> None:
    am = every_method
    x = model_input("llama", batch=1)
    am.set_adapter(["d", "i", "p"])
    as_list = output(am, x)
    am.set_adapter({"d": 1, "i": 1.0, "p": 1})
    assert torch.equal(output(am, x), as_list)


@pytest.mark.parametrize(
    "rows, error, fragments",
    [
        (
            [{"a": 0.5, "i": 1}, None],
            RequestError,
            ["adapter_names[0]", "'i' cannot be in a weighted set", "IA³"],
        ),
        ([None, {"d": 1, "a": 1}], RequestError, ["adapter_names[1]", "'d'", "DoRA", "plain name"]),
        ([{"a": math.inf}, None], RequestError, ["weight of adapter 'a' is inf"]),
        ([{"a": 0.5}, {"zz": 1}], AdapterNotFoundError, ["no adapter named 'zz'"]),
        ([{}, "a"], RequestError, ["empty {name: weight} mapping", "None in adapter_names"]),
        ([["a"], None], RequestError, ["adapter_names[0] is ['a']", "{name: weight} mapping"]),
    ],
)
def test_mixed_batch_refusals(every_method: AdaptedModel, rows: list, error, fragments: list[str]) -> None:
    x = model_input("llama", batch=len(rows))
    with raises(error, *fragments):
        every_method(x, adapter_names=rows)
    assert every_method.state.rows is None


def test_weighted_rows_share_a_batch_with_other_methods(every_method: AdaptedModel) -> None:
    """IA³ layers and soft prompts see a weighted row (LoRA adapters only) as a base-model row."""
    am = every_method
    rows = [{"a": 0.5}, "p", "i", None, "n", {"a": -2}, "m"]
    x = model_input("llama", batch=len(rows))
    with torch.no_grad():
        mixed = output(am, x, adapter_names=rows)
        for i, choice in enumerate(rows):
            torch.testing.assert_close(mixed[i], alone(am, x[i : i + 1], choice)[0], atol=1e-6, rtol=1e-5)


# -- evaluation and the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peftkit.base import load_base

    root = tmp_path_factory.mktemp("cli-weighted")
    torch.manual_seed(1)
    out = {}
    for name, targets in (("dates", ["q_proj", "v_proj"]), ("sentiment", ["v_proj", "down_proj"])):
        model, _ = load_base(str(tiny_model_dir))
        config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        out[name] = AdaptedModel.attach(model, config, name).save_adapter(root / name)
    return out


def tiny_with(base: Path, adapters: dict[str, Path]):
    from peftkit.base import load_base

    model, tokenizer = load_base(str(base))
    am = AdaptedModel(model)
    for name, path in adapters.items():
        am.load_adapter(path, name)
    return am, tokenizer


def test_generate_answers_and_nll_take_weighted_rows(
    tiny_model_dir: Path, cli_adapters: dict[str, Path]
) -> None:
    from peftkit.data.example import Example, Message
    from peftkit.eval.generation import answer_nll, generate_answers

    am, tokenizer = tiny_with(tiny_model_dir, cli_adapters)
    prompts = [[Message("user", "when")], [Message("user", "how is it")], [Message("user", "hi")]]
    rows = [{"dates": 0.7, "sentiment": 0.5}, None, {"sentiment": -1.0}]
    mixed = generate_answers(am, tokenizer, prompts, max_new_tokens=6, adapter_names=rows)
    examples = [Example((*p, Message("assistant", "ok then"))) for p in prompts]
    nll = answer_nll(am, tokenizer, examples, adapter_names=rows)
    for i, choice in enumerate(rows):
        if choice is None:
            with am.disable_adapters():
                single = generate_answers(am, tokenizer, prompts[i : i + 1], max_new_tokens=6)
                single_nll = answer_nll(am, tokenizer, examples[i : i + 1])
        else:
            am.set_adapter(choice)
            single = generate_answers(am, tokenizer, prompts[i : i + 1], max_new_tokens=6)
            single_nll = answer_nll(am, tokenizer, examples[i : i + 1])
        assert mixed[i] == single[0]
        assert nll[i][1] == single_nll[0][1] and math.isclose(nll[i][0], single_nll[0][0], rel_tol=1e-5)
    with raises(RequestError, "weight of adapter 'dates' is nan"):
        generate_answers(am, tokenizer, prompts[:1], max_new_tokens=1, adapter_names=[{"dates": math.nan}])


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_weighted_adapters_end_to_end(
    tiny_model_dir: Path,
    cli_adapters: dict[str, Path],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    from peftkit.data.example import Message
    from peftkit.eval.generation import generate_answers

    monkeypatch.setenv("PEFTKIT_CACHE", str(tiny_model_dir.parent / "cache"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"when is it\n")))
    dates, sentiment = cli_adapters["dates"], cli_adapters["sentiment"]
    argv = [command, "--base", tiny_model_dir, "--max-new-tokens", 8]
    argv += ["--prompt", "when is it"] if command == "generate" else []
    code, out, err = run([*argv, "--adapter", f"{dates}=0.7", f"{sentiment}=-0.5"], capsys)
    assert code == 0, err
    am, tokenizer = tiny_with(tiny_model_dir, cli_adapters)
    am.set_adapter({"dates": 0.7, "sentiment": -0.5})
    answer = generate_answers(am, tokenizer, [[Message("user", "when is it")]], max_new_tokens=8)[0]
    am.set_adapter("dates")
    other = generate_answers(am, tokenizer, [[Message("user", "when is it")]], max_new_tokens=8)[0]
    assert answer != other  # the weighted set answers differently from its first adapter alone
    assert out == (f">>> when is it\n{answer}\n\n" if command == "generate" else f"{answer}\n")


@pytest.fixture(scope="module")
def unweightable(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved adapters that take weight 1 only: DoRA and IA³."""
    from peftkit.base import load_base

    root = tmp_path_factory.mktemp("cli-unweightable")
    configs = {
        "dora": LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    out = {}
    for name, config in configs.items():
        model, _ = load_base(str(tiny_model_dir))
        out[name] = AdaptedModel.attach(model, config, name).save_adapter(root / name)
    return out


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("{dates}=abc", ["--adapter", "'abc' is not a weight", "DIR=WEIGHT", "=0.5"]),
        ("{dates}=nan", ["'nan' is not a weight", "finite"]),
        ("{missing}=0.5", ["no-such-adapter", "not found"]),
        ("dates={dates}", ["name each adapter after its directory", "DIR=WEIGHT, not NAME=DIR", "{dates}"]),
        ("{dora}=0.5", ["weight 1 only", "DoRA", "{dora} without =WEIGHT", "peftkit combine"]),
        ("{ia3}=2", ["weight 1 only", "IA³", "{ia3} without =WEIGHT", "peftkit combine"]),
    ],
)
def test_cli_refuses_bad_weighted_forms(
    tiny_model_dir: Path,
    cli_adapters: dict[str, Path],
    unweightable: dict[str, Path],
    capsys: pytest.CaptureFixture,
    spec: str,
    fragments: list[str],
) -> None:
    paths = {**cli_adapters, **unweightable, "missing": tiny_model_dir.parent / "no-such-adapter"}
    spec = spec.format(**paths)
    fragments = [f.format(**paths) for f in fragments]
    code, out, err = run(["generate", "--prompt", "hi", "--base", tiny_model_dir, "--adapter", spec], capsys)
    assert code == 2 and out == "" and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "loading base model" not in err, err
    for fragment in fragments:
        assert fragment in last, last


def test_docs_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """docs/combine.md's "Weighted adapters at inference": its ```py block runs, its commands parse."""
    import re
    import shlex

    from peftkit.cli import build_parser

    text = (Path(__file__).parents[1] / "docs/combine.md").read_text()
    section = text.split("## Weighted adapters at inference", 1)[1]
    monkeypatch.chdir(tmp_path)
    (block,) = re.findall(r"^```py\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    exec(compile(block, "docs/combine.md", "exec"), {"__name__": "docs"})
    assert "{'dates': 0.7, 'sentiment': 0.5}" in capsys.readouterr().out
    (sh,) = re.findall(r"^```sh\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    for line in sh.strip().splitlines():
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert len(args.adapter) == 2


def test_readme_says_which_command_takes_which_adapter_form() -> None:
    """generate/chat read X=Y as DIR=WEIGHT, eval and serve as NAME=DIR: the README must not say one
    form for all three."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### `peftkit eval`, `peftkit generate`, `peftkit chat`", 1)[1].split("\n### ", 1)[
        0
    ]
    prose = " ".join(section.split())
    assert "`eval --adapters NAME=DIR`" in prose and "`serve --adapters`" in prose
    assert "`generate` and `chat` take `--adapter DIR` or `DIR=WEIGHT`" in prose
    assert "or `NAME=DIR` names it" not in prose
