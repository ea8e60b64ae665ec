"""Prompt tuning and prefix tuning: parity with HF PEFT (same weights, same logits for the real tokens;
files load both ways; TEXT init), generation against a reference greedy loop, mixed batches against
per-row runs, training, the errors, and the transformers cache API that `peftkit.core.kv_prefix` relies on.

HF PEFT 0.21.2's own `generate` is broken on transformers 5.x for both methods (it looks for
`past_key_values` where transformers passes `cache`), so PEFT's forward is the oracle and generation is
checked against a greedy loop that re-runs the whole adapted forward every step. Parity batches are
unpadded or right-padded: PEFT's forward positions are arange(T) + P, peftkit's are padding-aware
(cumsum of the mask - 1, as generate's), and the two differ only for left-padded rows.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama
from torch import nn

from peftkit import AdaptedModel, LoraConfig
from peftkit.core.kv_prefix import cache_argument
from peftkit.errors import ConfigError, RequestError, ShapeMismatchError, TargetError
from peftkit.methods import METHODS
from peftkit.methods.prefix import PrefixTuningConfig, config_to_file
from peftkit.methods.prompt import PromptTuningConfig
from peftkit.tools.info import adapter_info, format_info

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}  # tiny_llama: 2 query heads share 1 key/value head
ATOL = 1e-6  # measured: 0.0 on every case here (the same operations in the same order)


def batch(rows: int = 3, length: int = 6, right_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask; with right_pad, row 0 ends in 2 pads and row 1 in 1."""
    ids = torch.randint(3, 64, (rows, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if right_pad:
        mask[0, -2:] = 0
        mask[1, -1:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def twins(arch: str, kit_config, peft_config) -> tuple[AdaptedModel, nn.Module]:
    """One base model for peftkit and a copy for PEFT, with the same adapter weights in both."""
    base = ARCHS[arch]()
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    am = AdaptedModel.attach(base, kit_config)
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        if isinstance(kit_config, PromptTuningConfig):
            am.model_adapters["default"].prompt_embeddings.copy_(encoder.embedding.weight)
        else:  # the same module names as PEFT's PrefixEncoder (embedding, transform)
            am.model_adapters["default"].load_state_dict(encoder.state_dict())
    return am, pm


def peft_logits(pm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt: int) -> torch.Tensor:
    """PEFT's logits for the real tokens (prompt tuning's carry the P virtual positions in front)."""
    return pm(input_ids=ids, attention_mask=mask).logits[:, prompt:]


def assert_same_on_real_tokens(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    assert got.shape == expected.shape
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=ATOL, rtol=0)


def both(prefix: PrefixTuningConfig) -> list:
    """A prompt-tuning config and `prefix`, with the same number of virtual tokens, as test cases."""
    prompt = PromptTuningConfig(num_virtual_tokens=prefix.num_virtual_tokens)
    name = "prefix-projection" if prefix.prefix_projection else "prefix"
    return [pytest.param(prompt, id="prompt"), pytest.param(prefix, id=name)]


PARITY = [
    pytest.param("prompt", {}, id="prompt"),
    pytest.param("prefix", {}, id="prefix"),
    pytest.param("prefix", {"prefix_projection": True, "encoder_hidden_size": 24}, id="prefix-projection"),
]


def configs(method: str, options: dict, p: int = 4):
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=p), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=p
        )
    kit = PrefixTuningConfig(num_virtual_tokens=p, **options)
    return kit, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, **options)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(("method", "options"), PARITY)
@torch.no_grad()
def test_same_weights_give_peft_logits_on_real_tokens(arch: str, method: str, options: dict) -> None:
    am, pm = twins(arch, *configs(method, options))
    ids, mask = batch()
    shift = 4 if method == "prompt" else 0
    expected = peft_logits(pm, ids, mask, shift)
    assert_same_on_real_tokens(am(input_ids=ids, attention_mask=mask).logits, expected, mask)
    positions = torch.arange(ids.shape[1]).expand_as(ids)  # given positions move past the prefix
    assert_same_on_real_tokens(
        am(input_ids=ids, attention_mask=mask, position_ids=positions).logits, expected, mask
    )
    with am.disable_adapters():
        base = am(input_ids=ids, attention_mask=mask).logits
    assert (base - expected).abs().max() > 1e-2, "the adapter must change the logits"


@pytest.mark.parametrize(("method", "options"), PARITY)
@torch.no_grad()
def test_files_load_both_ways(method: str, options: dict, tmp_path: Path) -> None:
    am, pm = twins("llama", *configs(method, options))
    ids, mask = batch()
    ours = am(input_ids=ids, attention_mask=mask).logits
    am.save_adapter(tmp_path / "kit")
    pm.save_pretrained(tmp_path / "peft")
    shift = 4 if method == "prompt" else 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pm.base_model), tmp_path / "kit").eval()
    assert_same_on_real_tokens(ours, peft_logits(loaded, ids, mask, shift), mask)
    kit = AdaptedModel.from_pretrained(copy.deepcopy(pm.base_model), tmp_path / "peft")
    assert_same_on_real_tokens(kit(input_ids=ids, attention_mask=mask).logits, ours, mask)
    file_config = json.loads((tmp_path / "kit" / "adapter_config.json").read_text())
    assert file_config["peft_type"] == METHODS[method].peft_type and file_config["task_type"] == "CAUSAL_LM"


def test_config_file_carries_peft_geometry(tmp_path: Path) -> None:
    """With the adapter, the file's geometry fields are PEFT's (prefix tuning counts key/value heads)."""
    for options in ({}, {"prefix_projection": True}):
        am, pm = twins("llama", *configs("prefix", options))
        pm.save_pretrained(tmp_path / "peft")
        theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        ours = config_to_file(am.adapter_config(), am.model_adapters["default"])
        for key in (
            "token_dim",
            "num_layers",
            "num_attention_heads",
            "num_transformer_submodules",
            "encoder_hidden_size",
        ):
            assert ours[key] == theirs[key], key


@pytest.mark.parametrize("tokenizer_only", [True, False])
def test_text_init_equals_peft(tokenizer_only: bool, tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    path = tmp_path / "tok" if tokenizer_only else tiny_model_dir  # a tokenizer directory, or a model's
    tokenizer.save_pretrained(tmp_path / "tok")
    base = tiny_llama()
    base.resize_token_embeddings(len(tokenizer))
    for n, text in ((5, "2024-01-31 is"), (30, "to ISO:")):  # cut, and repeated
        init = {"prompt_tuning_init_text": text, "tokenizer_name_or_path": str(path)}
        kit = PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init="text", **init)  # any case
        am = AdaptedModel.attach(copy.deepcopy(base), kit)
        theirs = peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT", **init
        )
        pm = peft.get_peft_model(copy.deepcopy(base), theirs)
        expected = pm.prompt_encoder["default"].embedding.weight
        assert torch.equal(am.model_adapters["default"].prompt_embeddings, expected)


def test_a_text_initialised_file_loads_without_its_tokenizer(tmp_path: Path) -> None:
    """The text only chose the starting values, which the file's tensor replaces (as in HF PEFT)."""
    char_tokenizer().save_pretrained(tmp_path / "tok")
    init = {"prompt_tuning_init_text": "to ISO:", "tokenizer_name_or_path": str(tmp_path / "tok")}
    base = tiny_llama()
    base.resize_token_embeddings(len(char_tokenizer()))
    theirs = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT", **init
    )
    pm = peft.get_peft_model(copy.deepcopy(base), theirs)
    pm.save_pretrained(tmp_path / "peft")
    shutil.rmtree(tmp_path / "tok")
    am = AdaptedModel.from_pretrained(base, tmp_path / "peft")
    assert torch.equal(
        am.model_adapters["default"].prompt_embeddings, pm.prompt_encoder["default"].embedding.weight
    )
    assert am.adapter_config().prompt_tuning_init == "RANDOM"


def test_text_init_names_what_is_missing(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="Answer:")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="smollm2-135m")
    other = {"prompt_tuning_init_text": "xyz", "tokenizer_name_or_path": str(tiny_model_dir)}
    with pytest.raises(ConfigError, match="beyond this model's 64 embeddings"):  # another model's tokenizer
        AdaptedModel.attach(tiny_llama(), PromptTuningConfig(prompt_tuning_init="TEXT", **other))
    bad = PromptTuningConfig(
        prompt_tuning_init="TEXT", prompt_tuning_init_text="Hi", tokenizer_name_or_path="./nowhere"
    )
    with pytest.raises(ConfigError, match="tokenizer_name_or_path './nowhere' gives no tokenizer"):
        AdaptedModel.attach(tiny_llama(), bad)


def reference_greedy(am: AdaptedModel, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole adapted forward every step (no cache reuse)."""
    eos = am.generation_config.eos_token_id
    for _ in range(steps):
        logits = am(input_ids=ids, attention_mask=mask).logits[:, -1]
        logits[:, eos] = float("-inf")  # as min_new_tokens does in generate
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


GENERATE = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize("config", both(PrefixTuningConfig(num_virtual_tokens=4)))
@torch.no_grad()
def test_generate_equals_a_reference_greedy_loop(config) -> None:
    am = AdaptedModel.attach(tiny_llama(), config)
    ids, mask = batch(right_pad=False)
    mask[0, :2] = 0  # left padding, as generation batches are padded: positions are padding-aware
    out = am.generate(input_ids=ids, attention_mask=mask, **GENERATE)
    assert torch.equal(out, reference_greedy(am, ids, mask, 5))
    with am.disable_adapters():
        assert not torch.equal(am.generate(input_ids=ids, attention_mask=mask, **GENERATE), out)


def mixed_model() -> AdaptedModel:
    am = AdaptedModel.attach(tiny_llama(), PromptTuningConfig(num_virtual_tokens=5), "prompt_a")
    am.add_adapter("prompt_b", PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB"))
    am.add_adapter("prefix_c", PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    am.add_adapter("lora_d", LoraConfig(r=2, init_lora_weights=False))
    return am


def alone(am: AdaptedModel, name: str | None, **kwargs) -> torch.Tensor:
    if name is None:
        with am.disable_adapters():
            return am(**kwargs).logits
    am.set_adapter(name)
    return am(**kwargs).logits


@torch.no_grad()
def test_mixed_batch_rows_equal_per_row_runs() -> None:
    am = mixed_model()
    names = ["prompt_a", None, "prompt_b", "prefix_c", "lora_d", "prompt_b"]
    ids, mask = batch(rows=len(names))
    mixed = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for i, name in enumerate(names):
        row = alone(am, name, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])[0]
        keep = mask[i].bool()
        torch.testing.assert_close(mixed[i][keep], row[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("beams", [1, 2])
@torch.no_grad()
def test_mixed_batch_generate_equals_per_row_generation(beams: int) -> None:
    am = mixed_model()
    names = ["prefix_c", "prompt_a", None, "lora_d", "prompt_b"]
    ids, _ = batch(rows=len(names), right_pad=False)
    kwargs = {**GENERATE, "num_beams": beams}
    mixed = am.generate(input_ids=ids, adapter_names=names, **kwargs)
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with am.disable_adapters():
                rows.append(am.generate(input_ids=ids[i : i + 1], **kwargs)[0])
        else:
            am.set_adapter(name)
            rows.append(am.generate(input_ids=ids[i : i + 1], **kwargs)[0])
        assert torch.equal(mixed[i], rows[-1]), f"row {i} ({name})"
    assert len({tuple(r[-5:].tolist()) for r in rows}) > 2


@pytest.mark.parametrize("config", both(PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True)))
def test_training_lowers_the_loss_and_changes_only_the_adapter(config) -> None:
    model = tiny_llama()
    with torch.no_grad():  # a frozen head at the usual init spans ~0.1 logits: nothing could fit
        model.lm_head.weight.mul_(20)
    am = AdaptedModel.attach(model, config)
    before = {k: v.clone() for k, v in am.model.state_dict().items()}
    adapter = {n: p.detach().clone() for n, p in am.model_adapters.named_parameters()}
    params = [p for p in am.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in am.model_adapters.parameters()}
    optimizer = torch.optim.AdamW(params, lr=0.1)
    ids, mask = batch(rows=4, length=8)
    labels = ids.masked_fill(mask == 0, -100)
    am.train()
    losses = []
    for _ in range(8):
        loss = am(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(before[k], v) for k, v in am.model.state_dict().items())
    assert all(not torch.equal(adapter[n], p) for n, p in am.model_adapters.named_parameters())


@pytest.mark.parametrize("config", both(PrefixTuningConfig(num_virtual_tokens=4)))
@torch.no_grad()
def test_adapted_inputs_bring_the_prefix_to_the_backbone_alone(config) -> None:
    """Training's fused loss runs the backbone alone with `adapted_inputs`: the same hidden states."""
    am = AdaptedModel.attach(tiny_llama(), config)
    ids, mask = batch()
    kwargs = am.adapted_inputs({"input_ids": ids, "attention_mask": mask, "use_cache": False})
    hidden = am.model.model(**kwargs).last_hidden_state  # (B, T, H)
    torch.testing.assert_close(am.model.lm_head(hidden), am(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_gradient_checkpointing_is_refused_with_a_clear_error(method: str) -> None:
    """Measured: with checkpointing on while training, transformers sets every layer's cache to None,
    so the prefix is gone and attention fails on mismatched shapes. Hence no checkpointing capability."""
    assert not METHODS[method].supports_gradient_checkpointing
    am = AdaptedModel.attach(tiny_llama(), METHODS[method].config_cls(num_virtual_tokens=3))
    ids, _ = batch(right_pad=False)
    with torch.no_grad():
        expected = am(input_ids=ids).logits
    am.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    am.train()
    with pytest.raises(RequestError, match="gradient checkpointing"):
        am(input_ids=ids)
    with torch.no_grad():  # without gradients nothing is checkpointed: the prefix is used as always
        torch.testing.assert_close(am(input_ids=ids).logits, expected)


def test_transformers_drops_the_cache_in_checkpointed_layers() -> None:
    """Pins the transformers behaviour behind supports_gradient_checkpointing=False: if this starts to
    fail (a prefix cache survives checkpointing), the capability can be measured again."""
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))] * 2)
    with pytest.raises(RuntimeError):
        model(
            input_ids=torch.tensor([[5, 6, 7]]),
            attention_mask=torch.ones(1, 6, dtype=torch.long),
            cache=cache,
        )


@torch.no_grad()
def test_the_transformers_cache_api_prefix_relies_on() -> None:
    """DynamicCache(ddp_cache_data=...) takes per-layer (B, H_kv, P, D) keys and values, reports P,
    iterates back as (keys, values, ...); the forward's argument and output are `cache`; and a cache
    appended in place gives the logits of the full sequence."""
    from transformers import DynamicCache

    model, ids = tiny_llama(), torch.randint(3, 64, (2, 9))
    assert cache_argument(model) == "cache"
    full = model(input_ids=ids).logits
    first = model(input_ids=ids[:, :4], use_cache=True).cache
    kv = [(k.clone(), v.clone()) for k, v, *_ in first]
    assert kv[0][0].shape == (2, 1, 4, 8)
    cache = DynamicCache(ddp_cache_data=kv)
    assert cache.get_seq_length() == 4
    assert all(torch.equal(k, a) and torch.equal(v, b) for (k, v, *_), (a, b) in zip(cache, kv))
    rest = model(input_ids=ids[:, 4:], attention_mask=torch.ones(2, 9, dtype=torch.long), cache=cache)
    torch.testing.assert_close(rest.logits, full[:, 4:], atol=1e-5, rtol=1e-4)
    assert rest.cache.get_seq_length() == 9, "the model appends to the cache it is given: build one per call"


@pytest.mark.parametrize("factory", [tiny_bert, tiny_cnn], ids=["bert", "cnn"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_model_without_a_reachable_attention_is_refused(method: str, factory) -> None:
    model = factory()
    am = AdaptedModel(model)
    with pytest.raises(TargetError, match=type(model).__name__) as error:
        am.add_adapter("a", METHODS[method].config_cls())
    assert "decoder language model" in str(error.value)
    assert am.adapters == [] and not len(am.model_adapters)


def test_a_file_for_another_geometry_is_refused(tmp_path: Path) -> None:
    am = AdaptedModel.attach(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3))
    am.save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "num_layers": 3}))
    fresh = AdaptedModel(tiny_llama())
    with pytest.raises(
        ShapeMismatchError, match="num_layers=3, but this base model .LlamaForCausalLM. has num_layers=2"
    ):
        fresh.load_adapter(tmp_path / "a", check_base=False)
    assert fresh.adapters == []
    path.write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError):  # a llama's table in a GPT-2 (wider key/value rows)
        AdaptedModel(tiny_gpt2()).load_adapter(tmp_path / "a", check_base=False)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="num_virtual_tokens: 0"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prompt_tuning_init: 'WORDS'"):
        PromptTuningConfig(prompt_tuning_init="words")
    with pytest.raises(ConfigError, match="did you mean 'num_virtual_tokens'"):
        PrefixTuningConfig.from_dict({"num_virtual_token": 8})
    config = PrefixTuningConfig(prefix_projection=True)
    assert config.replace(num_virtual_tokens=5) == PrefixTuningConfig(
        num_virtual_tokens=5, prefix_projection=True
    )


@pytest.mark.parametrize("config", both(PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)))
def test_info_describes_the_adapter(config, tmp_path: Path) -> None:
    AdaptedModel.attach(tiny_llama(), config).save_adapter(tmp_path / "a")
    facts = adapter_info(tmp_path / "a")
    assert facts["num_virtual_tokens"] == 3 and facts["target_layers"] == 0
    assert "virtual tokens" in format_info(facts)
