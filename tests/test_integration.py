"""The adapter library on the real built-in base model (SmolLM2-135M-Instruct). Seconds each.

The first run on a machine converts the GGUF once (~20 s) into the peftkit cache.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import AdaptedModel, LoraConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = peftkit.load_base("smollm2-135m", dtype=torch.float32)
    return model, tokenizer


def _prompts(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def _random_adapter(am: AdaptedModel, name: str, seed: int, **kwargs) -> None:
    """A non-trivial adapter: Kaiming A and a small random B, so generations change but stay fluent."""
    torch.manual_seed(seed)
    am.add_adapter(name, LoraConfig(r=8, lora_alpha=16, **kwargs))
    with torch.no_grad():
        for key, p in am.adapter_state_dict(name).items():
            if "lora_B" in key:
                p.normal_(std=0.02)


def test_zero_init_adapter_keeps_the_base_outputs_and_trains_few_params(smol):
    model, tokenizer = smol
    batch = _prompts(tokenizer, ["What is the capital of France?"])
    with torch.no_grad():
        base = model(**batch).logits
    am = AdaptedModel.attach(model, LoraConfig(r=16, lora_alpha=32))
    try:
        trainable, total = am.trainable_parameters()
        # r=16 on all 7 linear layers of 30 blocks: 16 * (in + out) per layer.
        per_block = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576))
        assert trainable == 30 * per_block
        assert trainable / total < 0.05
        with torch.no_grad():
            assert torch.equal(am(**batch).logits, base)
    finally:
        am.unload()


def test_mixed_batch_generate_equals_per_adapter_generation(smol):
    model, tokenizer = smol
    am = AdaptedModel(model)
    try:
        _random_adapter(am, "a", seed=1)
        _random_adapter(am, "b", seed=2, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
        questions = ["Name a colour.", "What is 2 + 2?", "Say hello."]
        batch = _prompts(tokenizer, questions)
        routes = ["a", None, "b"]
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        with torch.no_grad():
            mixed = am.generate(**batch, adapter_names=routes, **kwargs)
            single = {}
            for name in ("a", "b"):
                am.set_adapter(name)
                single[name] = am.generate(**batch, **kwargs)
            with am.disable_adapters():
                single[None] = am.generate(**batch, **kwargs)
        for row, name in enumerate(routes):
            assert torch.equal(mixed[row], single[name][row]), f"row {row} ({name}) differs"
        assert not torch.equal(single["a"], single[None]), "adapter a should change the generations"
    finally:
        am.unload()


def test_save_load_merge_round_trip_on_the_real_model(smol, tmp_path):
    model, tokenizer = smol
    batch = _prompts(tokenizer, ["Write one word."])
    am = AdaptedModel(model)
    try:
        _random_adapter(am, "a", seed=3, use_dora=True)
        with torch.no_grad():
            adapted = am(**batch).logits
        am.save_adapter(tmp_path / "a")
        am.delete_adapter("a")
        assert am.load_adapter(tmp_path / "a", "a") == "a"
        am.set_adapter("a")
        with torch.no_grad():
            assert torch.equal(am(**batch).logits, adapted)
            am.merge()
            merged = am(**batch).logits
            am.unmerge()
        torch.testing.assert_close(merged, adapted, atol=2e-4, rtol=0)
    finally:
        am.unload()


def test_hf_peft_loads_a_peftkit_adapter_of_the_real_model(smol, tmp_path):
    peft = pytest.importorskip("peft")
    model, tokenizer = smol
    batch = _prompts(tokenizer, ["What is the capital of France?"])
    am = AdaptedModel(model)
    try:
        _random_adapter(am, "a", seed=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        with torch.no_grad():
            ours = am(**batch).logits
        am.save_adapter(tmp_path / "a")
    finally:
        am.unload()
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "a").eval()
    try:
        with torch.no_grad():
            theirs = pm(**batch).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    finally:
        pm.unload()
