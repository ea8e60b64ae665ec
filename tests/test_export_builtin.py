"""The GGUF exports of the built-in model (SmolLM2-135M-Instruct) in real llama.cpp: the base at f32,
q8_0 and q4_0 against peftkit's float32 model, and a dates adapter trained here, exported both ways,
answering the demo's hand-written inputs as peftkit does. About three minutes, most of it training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llama_cpp_run import cpp_greedy, cpp_logits, llama, top1_agreement, torch_greedy, torch_logits

from peftkit.export.gguf_adapter import export_adapter_gguf
from peftkit.export.gguf_model import export_model_gguf

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread_per_training_child")]
quiet = {"log": lambda message: None}
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is.",
]
# Measured top-1 agreement (teacher-forced, 32 tokens after each question): q8_0 0.95, q4_0 0.74.
FLOORS = {"q8_0": 0.9, "q4_0": 0.6}


@pytest.fixture(scope="module")
def smol():
    from peftkit.base import load_base

    return load_base("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def base_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf"
    return export_model_gguf("smollm2-135m", [], out, qtype="f32", **quiet)


def chat_ids(tokenizer, question: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_the_f32_export_of_the_builtin_model_is_peftkits_model(smol, base_f32):
    model, tokenizer = smol
    with llama(base_f32, n_ctx=512) as llm:
        for question in QUESTIONS:
            ids = chat_ids(tokenizer, question)
            diff = np.abs(cpp_logits(llm, ids) - torch_logits(model, ids)).max()
            assert diff < 5e-4, f"max |logit diff| {diff} (logits span ~30)"  # measured: 9e-5
            assert cpp_greedy(llm, ids, 24) == torch_greedy(model, ids, 24)
        # the tokenizer came along: llama.cpp reads text as the base model's tokenizer does
        text = "<|im_start|>user\nThe capital of France is 2024-01-15<|im_end|>"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
        assert (
            llm.metadata["tokenizer.ggml.pre"] == "smollm"
            and "im_start" in llm.metadata["tokenizer.chat_template"]
        )


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_exports_agree_with_the_full_precision_model(smol, tmp_path, qtype):
    model, tokenizer = smol
    out = export_model_gguf("smollm2-135m", [], tmp_path / f"{qtype}.gguf", qtype=qtype, **quiet)
    with llama(out, n_ctx=512) as llm:
        agreement = [top1_agreement(llm, model, chat_ids(tokenizer, q), 32) for q in QUESTIONS]
    print(f"{qtype}: top-1 agreement with float32 peftkit {np.mean(agreement):.3f} ({agreement})")
    assert np.mean(agreement) >= FLOORS[qtype], agreement
    assert out.stat().st_size < (0.3 if qtype == "q4_0" else 0.4) * base_size(smol)


def base_size(smol) -> int:
    return sum(p.numel() for p in smol[0].parameters()) * 4


def test_a_trained_dates_adapter_answers_the_demos_inputs_in_llama_cpp_both_ways(
    smol, base_f32, tmp_path, dates_adapter
):
    """A short dates run (24 steps: 3 of the 4 hand-written inputs right; the demo's 80 get all 4,
    docs/export.md) exported merged and as a llama.cpp adapter: llama.cpp answers each input exactly
    as peftkit does, through the chat template in the GGUF file."""
    from peftkit.cli.demo import FRESH
    from peftkit.data.example import Message
    from peftkit.data.tasks import get_task
    from peftkit.eval.run import generate_answers
    from peftkit.tools.opening import open_model

    spec = get_task("dates")
    adapter = dates_adapter  # conftest: trained once per test run, shared with test_monitor_builtin
    questions = [f"{spec.instruction}\n{spec.label}: {text}" for text in FRESH["dates"]]
    opened = open_model("smollm2-135m", [("dates", adapter)], dtype="float32")
    prompts = [[Message("user", q)] for q in questions]
    ours = generate_answers(opened.model, opened.tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                            adapter_names=["dates"] * len(prompts))  # fmt: skip
    merged = export_model_gguf("smollm2-135m", [adapter], tmp_path / "dates.gguf", qtype="f32", **quiet)
    lora = export_adapter_gguf(adapter, tmp_path / "dates-lora.gguf", **quiet)
    for path, extra in ((merged, None), (base_f32, lora)):
        with llama(path, lora=extra, n_ctx=512) as llm:
            theirs = [
                llm.create_chat_completion([{"role": "user", "content": q}], temperature=0,
                                           max_tokens=spec.max_new_tokens)["choices"][0]["message"]["content"]
                for q in questions
            ]  # fmt: skip
        assert [t.strip() for t in theirs] == [o.strip() for o in ours], (path.name, theirs, ours)
    right = {"1976-07-04", "2031-09-09", "1999-12-31", "2015-02-02"}
    assert sum(answer.strip() in right for answer in ours) >= 3, ours
