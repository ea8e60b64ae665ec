"""Adapters of every method on one model: one mixed batch across all of them (forward and beam
search) equals each row run alone; refusals change nothing; unload leaves no adapter behind."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from peftkit import (
    AdaptedModel,
    AdapterStateError,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftkitError,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from peftkit.base.nf4 import NF4Linear, quantize_model
from peftkit.train.optim import Trainable

NAMES = ["lora", "ia3", "prompt", None, "prefix", "bottleneck", "ia3"]


def every_method() -> AdaptedModel:
    """One adapter of each method, on layers of their own (two methods never wrap one layer)."""
    am = AdaptedModel.attach(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora"
    )
    am.add_adapter(
        "ia3",
        IA3Config(
            target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    )
    am.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=3))
    am.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=2))
    am.add_adapter(
        "bottleneck", BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4, init_weights=False)
    )
    return am  # fmt: skip


def alone(am: AdaptedModel, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    if name is None:
        with am.disable_adapters():
            return am(input_ids=ids).logits
    am.set_adapter(name)
    return am(input_ids=ids).logits


@torch.no_grad()
def test_a_mixed_batch_across_every_method_equals_each_row_alone() -> None:
    am = every_method()
    ids = torch.randint(1, 60, (len(NAMES), 6), generator=torch.Generator().manual_seed(0))
    mixed = am(input_ids=ids, adapter_names=NAMES).logits
    rows = [alone(am, name, ids[i : i + 1])[0] for i, name in enumerate(NAMES)]
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], row, atol=1e-5, rtol=1e-4)
    distinct = {name: rows[i] for i, name in enumerate(NAMES)}
    assert all(not torch.allclose(distinct[a], distinct[None], atol=1e-4) for a in distinct if a), (
        "each changes"
    )
    assert am.state.rows is None and not am.state.disabled  # nothing left behind


@pytest.mark.parametrize("beams", [1, 3])
@torch.no_grad()
def test_generate_across_every_method_equals_each_row_alone(beams: int) -> None:
    am = every_method()
    ids = torch.randint(1, 60, (len(NAMES), 5), generator=torch.Generator().manual_seed(1))
    greedy = {
        "max_new_tokens": 3,
        "min_new_tokens": 3,
        "do_sample": False,
        "num_beams": beams,
        "pad_token_id": 0,
    }
    mixed = am.generate(input_ids=ids, adapter_names=NAMES, **greedy)
    for i, name in enumerate(NAMES):
        if name is None:
            with am.disable_adapters():
                row = am.generate(input_ids=ids[i : i + 1], **greedy)[0]
        else:
            am.set_adapter(name)
            row = am.generate(input_ids=ids[i : i + 1], **greedy)[0]
        assert torch.equal(mixed[i], row), f"row {i} ({name})"


def test_unload_leaves_no_whole_model_adapter_behind() -> None:
    am = AdaptedModel.attach(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2), "p")
    plain = am.unload()
    assert len(am.model_adapters) == 0 and am.adapters == [] and plain is am.model
    am.add_adapter("q", LoraConfig(r=2))
    trainable = Trainable.of(am)  # was a KeyError for the stale prompt
    assert {n.split(".")[0] for n in trainable.names} == {"model"}


def test_a_refused_whole_model_adapter_changes_nothing() -> None:
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    config = PromptTuningConfig(
        num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
        tokenizer_name_or_path="/no/such/tokenizer",
    )  # fmt: skip
    with pytest.raises(PeftkitError):
        AdaptedModel.attach(model, config)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_merge_and_unload_refused_on_a_4bit_base_changes_nothing() -> None:
    model = tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    am = AdaptedModel.attach(model, BottleneckConfig(target_modules=["down_proj"], bottleneck_size=4), "b")
    count = sum(isinstance(m, NF4Linear) for m in am.model.modules())
    with pytest.raises(AdapterStateError, match="cannot be merged"):
        am.merge_and_unload()
    assert sum(isinstance(m, NF4Linear) for m in am.model.modules()) == count  # nothing dequantized


@torch.no_grad()
def test_a_soft_prompt_starts_from_the_plain_embeddings_next_to_an_embedding_lora() -> None:
    am = AdaptedModel.attach(
        tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False), "emb"
    )
    torch.manual_seed(5)
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    table = am.model.model.embed_tokens.base_layer.weight
    prompt = am.model_adapters["p"].prompt_embeddings
    assert all(any(torch.equal(row, t) for t in table) for row in prompt), "rows of the plain table"
    ids = torch.randint(1, 60, (2, 5))
    for name in ("p", "emb"):
        am.set_adapter(name)
        assert am(input_ids=ids).logits.isfinite().all()
