"""Bad input gets a clear error, and nothing is half-applied.

Every test checks three things: the exception type (from `peftkit.errors`), that the message names
the problem (module, key, shapes, path...), and that the model is exactly as it was before.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import model_input, output, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from peftkit import (
    METHODS,
    AdaptedModel,
    AdapterFileError,
    AdapterStateError,
    BaseModelMismatchError,
    ConfigError,
    LoraConfig,
    PeftkitError,
    ShapeMismatchError,
    TargetError,
)
from peftkit.errors import RequestError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
SOURCE_CONFIG = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture
def am() -> AdaptedModel:
    """A tiny Llama that already carries one adapter ("keep"), so a failed load has something to spoil."""
    return AdaptedModel.attach(
        tiny_llama(), LoraConfig(target_modules=["k_proj"], init_lora_weights=False), "keep"
    )


@pytest.fixture
def saved(am: AdaptedModel, tmp_path: Path) -> Path:
    """A valid adapter saved from a copy of `am`'s base model (so the fingerprints agree)."""
    base = copy.deepcopy(am).unload()
    return AdaptedModel.attach(base, SOURCE_CONFIG, "src").save_adapter(tmp_path / "adapter")


def capture(model: nn.Module) -> dict:
    """Everything a failed call must leave alone."""
    am = model if isinstance(model, AdaptedModel) else None
    inner = am.model if am else model
    return {
        "types": [(n, type(m)) for n, m in inner.named_modules()],
        "tensors": {k: v.clone() for k, v in inner.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in inner.named_parameters()},
        "adapters": (am.adapters, am.active_adapters, am.merged_adapters) if am else None,
        "output": output(model, model_input("llama")),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = capture(model)
    for key in ("types", "requires_grad", "adapters"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert torch.equal(after["output"], before["output"])


def raises(exc: type[Exception], *fragments: str):
    """pytest.raises that also requires every fragment (literally) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def tiny_llama_with_hidden(hidden: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_llama().config.to_dict() | {"hidden_size": hidden, "head_dim": hidden // 2}
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


# -- loading: the adapter does not fit this base --------------------------------------------------------
def test_the_untouched_adapter_loads(am: AdaptedModel, saved: Path) -> None:
    """The control for every corruption below: without it, the adapter loads."""
    am.load_adapter(saved, "new")
    assert am.adapters == ["keep", "new"]


def test_shapes_that_do_not_fit_name_the_module_and_both_shapes(saved: Path) -> None:
    am = AdaptedModel(tiny_llama_with_hidden(24))
    before = capture(am)
    with raises(ShapeMismatchError, "model.layers.0.self_attn.q_proj", "(4, 24)", "(4, 16)", str(saved)):
        am.load_adapter(saved, "new", check_base=False)
    with pytest.raises((ShapeMismatchError, BaseModelMismatchError)):
        am.load_adapter(saved, "new")
    assert_unchanged(am, before)


def test_another_base_with_the_same_shapes_is_refused_unless_asked(saved: Path) -> None:
    torch.manual_seed(1)
    am = AdaptedModel(tiny_llama())
    before = capture(am)
    with raises(
        BaseModelMismatchError,
        str(saved),
        "fingerprint",
        "--no-check-base (check_base=False in Python)",
    ):
        am.load_adapter(saved, "new")
    assert_unchanged(am, before)
    am.load_adapter(saved, "new", check_base=False)
    assert am.adapters == ["new"]
    loaded = am.adapter_state_dict("new")
    with safe_open(str(saved / WEIGHTS_FILE), "pt") as f:
        assert loaded.keys() == set(f.keys())
        assert all(torch.equal(loaded[k], f.get_tensor(k)) for k in loaded)


# -- loading: broken or foreign files -----------------------------------------------------------------
def edit_config(**changes) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads((path / CONFIG_FILE).read_text())
        (path / CONFIG_FILE).write_text(json.dumps(data | changes))

    return apply


def edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        change(tensors)
        save_file(tensors, str(path / WEIGHTS_FILE), metadata=metadata)

    return apply


def truncate(keep: float) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = (path / WEIGHTS_FILE).read_bytes()
        (path / WEIGHTS_FILE).write_bytes(data[: int(len(data) * keep)])

    return apply


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
FOREIGN = next(
    t for t in ("LOHA", "LOKR", "VERA", "BOFT") if t not in {m.peft_type for m in METHODS.values()}
)
BROKEN = {  # name: (how to break the saved adapter, error type, what its message must name)
    "unknown PEFT feature": (
        edit_config(layer_replication=[[0, 1]]),
        AdapterFileError,
        ["layer_replication", "[[0, 1]]"],
    ),
    "peft_type of no method": (
        edit_config(peft_type=FOREIGN),
        AdapterFileError,
        ["peft_type", repr(FOREIGN)],
    ),
    "invalid config value": (edit_config(r=0), AdapterFileError, ["invalid value for r: 0"]),
    "corrupt JSON": (
        lambda p: (p / CONFIG_FILE).write_text('{"r": 4,'),
        AdapterFileError,
        [CONFIG_FILE, "not valid JSON"],
    ),
    "JSON not an object": (
        lambda p: (p / CONFIG_FILE).write_text("[1, 2]"),
        AdapterFileError,
        [CONFIG_FILE, "list"],
    ),
    "missing config": (lambda p: (p / CONFIG_FILE).unlink(), AdapterFileError, [CONFIG_FILE]),
    "missing weights": (lambda p: (p / WEIGHTS_FILE).unlink(), AdapterFileError, [WEIGHTS_FILE, CONFIG_FILE]),
    "truncated weights": (truncate(0.6), AdapterFileError, [WEIGHTS_FILE, "truncated"]),
    "truncated header": (truncate(0.02), AdapterFileError, [WEIGHTS_FILE, "truncated"]),
    "random bytes": (
        lambda p: (p / WEIGHTS_FILE).write_bytes(random.Random(0).randbytes(300)),
        AdapterFileError,
        [WEIGHTS_FILE, "corrupt"],
    ),
    "extra tensor": (
        edit_tensors(lambda t: t.update({"base_model.model.model.extra.lora_A.weight": torch.ones(2)})),
        AdapterFileError,
        ["base_model.model.model.extra.lora_A.weight"],
    ),
    "base weight copy differs": (  # HF PEFT's save_embedding_layers: checked, never applied
        edit_tensors(lambda t: t.update({"base_model.model.model.norm.weight": torch.full((16,), 2.0)})),
        BaseModelMismatchError,
        ["model.norm.weight"],
    ),
    "missing tensor": (
        edit_tensors(lambda t: t.pop(Q_A)),
        AdapterFileError,
        [Q_A, "layers.1.self_attn.q_proj"],
    ),
    "wrong shape": (
        edit_tensors(lambda t: t.update({Q_A: torch.zeros(4, 17)})),
        ShapeMismatchError,
        ["layers.1.self_attn.q_proj", "(4, 16)", "(4, 17)"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_files_are_refused(case: str, am: AdaptedModel, saved: Path) -> None:
    breaks, exc, fragments = BROKEN[case]
    breaks(saved)
    before = capture(am)
    with raises(exc, str(saved), *fragments):
        am.load_adapter(saved, "new")
    assert_unchanged(am, before)


def test_missing_directory(am: AdaptedModel, tmp_path: Path) -> None:
    before = capture(am)
    with raises(AdapterFileError, str(tmp_path / "nowhere")):
        am.load_adapter(tmp_path / "nowhere", "new")
    assert_unchanged(am, before)


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_weights_are_refused_and_never_unpickled(am: AdaptedModel, saved: Path) -> None:
    marker = saved.parent / "unpickled.marker"
    blob = pickle.dumps({"weights": _Payload(marker)})
    (saved / WEIGHTS_FILE).unlink()
    (saved / "adapter_model.bin").write_bytes(blob)
    before = capture(am)
    for path in (saved, saved / "adapter_model.bin"):
        with raises(AdapterFileError, str(saved / "adapter_model.bin"), "pickle"):
            am.load_adapter(path, "new")
    assert not marker.exists()
    assert_unchanged(am, before)
    pickle.loads(blob)  # the payload is live: loading it would have left the marker
    assert marker.exists()


# -- attaching: config and targets ------------------------------------------------------------------------
def test_unknown_config_key_is_named_with_the_close_one() -> None:
    with raises(ConfigError, "'lora_alpah'", "did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 4, "lora_alpah": 16})


INVALID = [  # (config fields, what the message must name)
    ({"r": 0}, ["invalid value for r: 0", "positive integer"]),
    ({"lora_dropout": 1.5}, ["lora_dropout: 1.5", "[0, 1)"]),
    ({"bias": "x"}, ["bias: 'x'", "lora_only"]),
    ({"target_modules": "q_proj("}, ["target_modules", "regular expression"]),
    ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern['q_proj']: 0"]),
    ({"alpha_pattern": {"[": 2}}, ["alpha_pattern key '['", "regular expression"]),
    ({"layers_to_transform": [-1]}, ["layers_to_transform: (-1,)"]),
    ({"init_lora_weights": "pissa"}, ["init_lora_weights: 'pissa'"]),
]


@pytest.mark.parametrize("changes,fragments", INVALID, ids=[next(iter(c)) for c, _ in INVALID])
def test_invalid_values_name_the_key_and_the_value(changes: dict, fragments: list[str]) -> None:
    with raises(ConfigError, *fragments):
        LoraConfig(**changes)


@pytest.mark.parametrize(
    "config,fragments",
    [
        (LoraConfig(target_modules=["nope"]), ["['nope']", "LlamaForCausalLM", "q_proj", "down_proj"]),
        (LoraConfig(target_modules=["proj"]), ["['proj']", "q_proj"]),
        (LoraConfig(target_modules=["mlp"]), ["'model.layers.0.mlp'", "LlamaMLP", "nn.Linear"]),
        (LoraConfig(target_modules=r".*\.(q_proj|mlp)"), ["'model.layers.0.mlp'", "LlamaMLP"]),
        (LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]), ["layers_to_transform=[7]"]),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["nope"]), ["modules_to_save", "'nope'"]),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["self_attn"]), ["q_proj", "modules_to_save"]),
    ],
    ids=["nothing", "substring", "unsupported-type", "unsupported-by-regex", "layers", "save", "both"],
)
def test_bad_targets_change_nothing(am: AdaptedModel, config: LoraConfig, fragments: list[str]) -> None:
    before = capture(am)
    with raises(TargetError, *fragments):
        am.add_adapter("new", config)
    assert_unchanged(am, before)


def test_unsupported_layer_configuration_is_named() -> None:
    conv = nn.Conv2d(4, 4, 3, groups=2)
    model = nn.Sequential(conv)
    with raises(TargetError, "'0'", "groups=2"):
        AdaptedModel.attach(model, LoraConfig(target_modules=["0"]))
    assert model[0] is conv


def test_failed_attach_leaves_the_plain_model_alone() -> None:
    model = tiny_llama().requires_grad_(False)
    before = capture(model)
    with raises(TargetError, "['nope']"):
        AdaptedModel.attach(model, LoraConfig(target_modules=["nope"]))
    assert_unchanged(model, before)


def test_failed_attach_keeps_requires_grad() -> None:
    model = tiny_llama()
    with pytest.raises(TargetError):
        AdaptedModel.attach(model, LoraConfig(target_modules=["nope"]))
    assert all(p.requires_grad for p in model.parameters())


# -- adapter names and state ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["keep", "", "a.b", "a/b", "../x", "a b", "base", "__base__", None, 3])
def test_clashing_or_invalid_names(am: AdaptedModel, saved: Path, name: object) -> None:
    before = capture(am)
    fragment = {"keep": "already exists", "base": "means the base model", "__base__": "means the base model"}
    fragment = fragment.get(name, "invalid") if isinstance(name, str) else "invalid"
    with raises(ConfigError, repr(name), fragment):
        am.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    with raises(ConfigError, repr(name), fragment):
        am.load_adapter(saved, name)
    assert_unchanged(am, before)


@pytest.mark.parametrize("name", ["keys", "forward"])
def test_names_that_clash_with_module_attributes(am: AdaptedModel, name: str) -> None:
    before = capture(am)
    with raises(ConfigError, repr(name)):
        am.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert_unchanged(am, before)


def test_unknown_adapter_names(am: AdaptedModel) -> None:
    before = capture(am)
    x = model_input("llama", batch=2)
    calls = [
        lambda: am(x, adapter_names=["keep", "nope"]),
        lambda: am.set_adapter(["keep", "nope"]),
        lambda: am.delete_adapter("nope"),
        lambda: am.merge(["nope"]),
    ]
    for call in calls:
        with raises(LookupError, "'nope'", "keep"):
            call()
    with raises(ValueError, "2 entries", "3 rows"):
        am(model_input("llama", batch=3), adapter_names=["keep", None])
    assert_unchanged(am, before)


def test_name_errors_are_peftkit_errors(am: AdaptedModel) -> None:
    with pytest.raises(PeftkitError):
        am.set_adapter("nope")
    with pytest.raises(PeftkitError):
        am(model_input("llama", batch=3), adapter_names=["keep"])


def test_an_error_inside_a_mixed_batch_or_disabled_block_leaves_no_state_behind(am: AdaptedModel) -> None:
    before = capture(am)
    bad = model_input("llama").clone()
    bad[0, 0] = 10_000  # no such token: the embedding raises inside the forward
    with pytest.raises(IndexError):
        am(bad, adapter_names=["keep", None, None])
    with pytest.raises(RuntimeError, match="inside"), am.disable_adapters():
        raise RuntimeError("inside")
    assert_unchanged(am, before)


def test_mixed_batch_disable_or_delete_while_merged(am: AdaptedModel) -> None:
    am.merge()
    before = capture(am)
    x = model_input("llama", batch=2)
    with raises(AdapterStateError, "'keep'", "unmerge"):
        am(x, adapter_names=["keep", None])
    with raises(AdapterStateError, "'keep'", "unmerge"), am.disable_adapters():
        pass
    with raises(AdapterStateError, "'keep'", "unmerge"):
        am.delete_adapter("keep")
    assert_unchanged(am, before)


@pytest.mark.parametrize(
    "targets,fragments",
    [(["embed_tokens", "q_proj"], ["model.embed_tokens", "lm_head.weight"]), (["lm_head"], ["embed_tokens"])],
)
def test_merging_into_tied_weights_is_refused(targets: list[str], fragments: list[str]) -> None:
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    am = AdaptedModel.attach(model, LoraConfig(target_modules=targets, init_lora_weights=False))
    before = capture(am)
    with raises(AdapterStateError, "tied", *fragments):
        am.merge()
    assert_unchanged(am, before)


# -- saving -----------------------------------------------------------------------------------------------
def test_saving_over_an_adapter_replaces_both_files(am: AdaptedModel, saved: Path) -> None:
    am.save_adapter(saved, "keep")  # over the "src" adapter: other rank, other targets
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temporary leftovers
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["r"] == 8 and config["target_modules"] == [
        f"model.layers.{i}.self_attn.k_proj" for i in (0, 1)
    ]
    copy.deepcopy(am).load_adapter(saved, "again")  # config and tensors agree: it loads


def test_failed_save_raises_and_leaves_nothing_behind(am: AdaptedModel, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a directory")
    with raises(AdapterFileError, str(target), "not a directory"):
        am.save_adapter(target)
    assert target.read_text() == "not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_saved_adapters_get_the_usual_file_permissions(am: AdaptedModel, tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        am.save_adapter(tmp_path / "shared")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755


# -- one module, two adapters: LoRA layers and whole copies (modules_to_save) do not mix ---------------
LORA_ON_HEAD = LoraConfig(target_modules=["q_proj", "lm_head"], init_lora_weights=False)
HEAD_COPY = LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
LAYER_COPY = LoraConfig(
    target_modules=["v_proj"], layers_to_transform=[1], modules_to_save=["layers.0"], init_lora_weights=False
)


@pytest.mark.parametrize("how", ["add", "load"])
@pytest.mark.parametrize(
    "first,second,fragments",
    [
        (LORA_ON_HEAD, HEAD_COPY, ["modules_to_save entry 'lm_head'", "'first' already has LoRA layers"]),
        (HEAD_COPY, LORA_ON_HEAD, ["LoRA target 'lm_head'", "'first' already has a whole copy"]),
        (LORA_ON_HEAD, LAYER_COPY, ["'model.layers.0'", "'model.layers.0.self_attn.q_proj', inside it"]),
        (LAYER_COPY, LORA_ON_HEAD, ["'model.layers.0.self_attn.q_proj'", "'model.layers.0', which holds it"]),
        (HEAD_COPY, LAYER_COPY, ["'model.layers.0'", "'model.layers.0.self_attn.q_proj', inside it"]),
    ],
    ids=[
        "lora-then-copy",
        "copy-then-lora",
        "lora-inside-new-copy",
        "new-lora-inside-copy",
        "copy-holds-lora",
    ],
)
def test_lora_and_a_whole_copy_on_one_module_are_refused_before_anything_changes(
    tmp_path: Path, how: str, first: LoraConfig, second: LoraConfig, fragments: list[str]
) -> None:
    model = tiny_llama()
    source = AdaptedModel.attach(copy.deepcopy(model), second, "src")  # the same base, so it loads
    saved = source.save_adapter(tmp_path / "second")
    am = AdaptedModel.attach(model, first, "first")
    before = capture(am)
    with raises(TargetError, *fragments, "delete_adapter('first')"):
        if how == "add":
            am.add_adapter("second", second)
        else:
            am.load_adapter(saved, "second")
    assert_unchanged(am, before)
    am.delete_adapter("first")  # once the first adapter is gone, the second fits
    am.load_adapter(saved, "second")


def test_two_adapters_may_both_keep_a_copy_of_one_module(am: AdaptedModel) -> None:
    am.add_adapter("one", HEAD_COPY)
    am.add_adapter("two", HEAD_COPY)
    assert list(am.model.lm_head.modules_to_save) == ["one", "two"]


# -- mixed batches: one adapter name per row, however the batch is passed --------------------------------
@pytest.fixture
def two() -> AdaptedModel:
    """Two adapters with LoRA layers and their own output heads, so every routing path runs."""
    am = AdaptedModel(tiny_llama())
    for name in ("a", "b"):
        am.add_adapter(name, HEAD_COPY)
        with torch.no_grad():
            for p in am.model.lm_head.modules_to_save[name].parameters():
                p.normal_()
    return am


GREEDY = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize(
    "call",
    [
        lambda am, x: am.generate(inputs=x, attention_mask=torch.ones_like(x), adapter_names=["a"], **GREEDY),
        lambda am, x: am.generate(x, adapter_names=["a"], **GREEDY),
        lambda am, x: am.generate(input_ids=x, adapter_names=["a", "b", None], **GREEDY),
        lambda am, x: am.generate(input_ids=x, adapter_names=["a"], num_beams=2, **GREEDY),
        lambda am, x: am(attention_mask=torch.ones_like(x), input_ids=x, adapter_names=["a"]),
    ],
    ids=["inputs-and-mask", "positional", "more-names", "names-for-beams", "forward"],
)
def test_adapter_names_must_match_the_rows(two: AdaptedModel, call: Callable) -> None:
    before = capture(two)
    with raises(RequestError, "adapter_names has", "for a batch of 2 rows", "one per row"):
        call(two, model_input("llama", batch=2))
    assert_unchanged(two, before)


def test_a_layer_refuses_a_batch_its_names_do_not_fit(two: AdaptedModel) -> None:
    """Without a batch size to check up front, the layers check every batch: 2 rows for 1 name is no
    beam search (expand 1), so it is an error, not the first name for both rows."""
    with raises(RequestError, "a batch of 2 rows does not fit 1 adapter_names"), two.mixed_batch(["a"]):
        two.model(model_input("llama", batch=2))


def test_a_lora_layer_refuses_a_batch_its_names_do_not_fit(am: AdaptedModel) -> None:
    """The same check in the LoRA layers (RowRouting.repeat_for), for adapters with no whole copies."""
    with raises(RequestError, "a batch of 2 rows does not fit 1 adapter_names"), am.mixed_batch(["keep"]):
        am.model(model_input("llama", batch=2))


def test_names_per_beam_are_taken_when_each_rows_beams_agree(two: AdaptedModel) -> None:
    x, kw = model_input("llama", batch=2), GREEDY | {"num_beams": 2, "num_return_sequences": 2}
    per_row = two.generate(input_ids=x, adapter_names=["a", "b"], **kw)
    per_beam = two.generate(input_ids=x, adapter_names=["a", "a", "b", "b"], **kw)  # rows x beams
    assert torch.equal(per_row, per_beam)
    before = capture(two)
    with raises(RequestError, "adapter_names for the 2 beams of row 0 differ", "one name per row"):
        two.generate(input_ids=x, adapter_names=["a", "b", "b", "b"], **kw)
    assert_unchanged(two, before)


@pytest.mark.parametrize("beams", [1, 2, 3])
def test_beam_search_with_mixed_adapters_equals_each_adapter_alone(two: AdaptedModel, beams: int) -> None:
    x = model_input("llama", batch=2)
    kw = GREEDY | {"num_beams": beams, "num_return_sequences": beams}
    mixed = two.generate(input_ids=x, adapter_names=["a", "b"], **kw)  # (2 * beams, T + 3)
    alone = []
    for i, name in enumerate(["a", "b"]):
        two.set_adapter(name)
        alone.append(two.generate(input_ids=x[i : i + 1], **kw))
    assert torch.equal(mixed, torch.cat(alone))
    assert not torch.equal(alone[0][:, -3:], alone[1][:, -3:])  # the adapters differ, so order matters


# -- active adapters ----------------------------------------------------------------------------------------
def test_set_adapter_needs_at_least_one_distinct_name(am: AdaptedModel) -> None:
    before = capture(am)
    with raises(RequestError, "set_adapter([])", "disable_adapters()"):
        am.set_adapter([])
    with raises(RequestError, "names an adapter twice"):
        am.set_adapter(["keep", "keep"])
    with raises(RequestError, "not None", "disable_adapters()"):
        am.set_adapter(None)
    am.set_adapter({"keep"})  # any iterable of names will do
    assert am.active_adapters == ["keep"]
    assert_unchanged(am, before)


def test_deleting_the_active_adapter_activates_another_and_says_so(am: AdaptedModel) -> None:
    am.add_adapter("other", LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    x = model_input("llama")
    with pytest.warns(UserWarning, match="deleted the active adapter 'keep'; adapter 'other' is active now"):
        am.delete_adapter("keep")
    assert am.active_adapters == ["other"]  # as HF PEFT does: not the base model, unannounced
    with am.disable_adapters():
        base = output(am, x)
    assert not torch.equal(output(am, x), base)


def test_deleting_one_of_several_active_adapters_keeps_the_rest(am: AdaptedModel, recwarn) -> None:
    am.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    am.add_adapter("third", LoraConfig(target_modules=["q_proj"]))
    am.set_adapter(["keep", "other"])
    am.delete_adapter("keep")
    am.delete_adapter("third")  # not active: nothing to say
    assert am.active_adapters == ["other"] and not recwarn.list
    am.delete_adapter("other")  # the last one: the plain model is what is left
    assert am.adapters == [] and am.active_adapters == [] and not recwarn.list
