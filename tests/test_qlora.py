"""QLoRA: LoRA and DoRA over a frozen NF4 base. Gradients flow through the 4-bit layers whatever ran
before (bitsandbytes' own Linear4bit drops them after an eval-mode forward on CPU), outputs equal the
same adapter on the dequantized weights, merging goes into a dequantized copy, adapters move between
the 4-bit and full-precision forms of a base with a note, and `peftkit train/merge --quantize nf4` work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import model_input, tiny_llama
from test_train import make_data

from peftkit import AdaptedModel, AdapterStateError, LoraConfig
from peftkit.base import load_base
from peftkit.base.nf4 import NF4Linear, quantize_model
from peftkit.cli import main
from peftkit.core.layer_types import dequantize_model, fast_decoding
from peftkit.identity import AdapterIdentity
from peftkit.train.config import load_config
from peftkit.train.loop import train


def quantized_and_dense(**llama) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama with NF4 linear layers (fp32 compute), and a float copy holding the very weights
    those layers dequantize to: the reference every QLoRA output must equal."""
    model = tiny_llama(**llama)
    quantize_model(model, compute_dtype=torch.float32)
    dense = copy.deepcopy(model)
    dequantize_model(dense)
    return model, dense


def lora(use_dora: bool = False) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=use_dora)


def same_adapter(model: torch.nn.Module, dense: torch.nn.Module, config: LoraConfig):
    """The same (random) adapter on both models."""
    torch.manual_seed(3)
    q = AdaptedModel.attach(model, config)
    d = AdaptedModel.attach(dense, config)
    with torch.no_grad():
        for key, value in q.adapter_state_dict("default").items():
            d.adapter_state_dict("default")[key].copy_(value)
    return q, d


@pytest.mark.parametrize("use_dora", [False, True])
def test_eval_then_train_keeps_the_gradient_through_the_4bit_base(use_dora: bool) -> None:
    """The trap: an eval-mode forward without gradients first, then a training step. The adapter's
    gradients must equal those of the same adapter on the dequantized weights."""
    model, dense = quantized_and_dense()
    q, d = same_adapter(model, dense, lora(use_dora))
    x = model_input("llama", batch=2)
    q.eval()
    with torch.no_grad():
        q(input_ids=x)  # bitsandbytes' CPU Linear4bit repacks its weight here, and later drops gradients
    for am in (q, d):
        am.train()
        am(input_ids=x).logits.square().mean().backward()
    grads_q = {k: p.grad for k, p in q.adapter_state_dict("default").items()}
    grads_d = {k: p.grad for k, p in d.adapter_state_dict("default").items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads_q.values())
    for key in grads_q:
        torch.testing.assert_close(grads_q[key], grads_d[key], atol=1e-6, rtol=1e-5)


def test_outputs_equal_the_adapter_on_the_dequantized_base_and_merging_goes_into_a_copy() -> None:
    model, dense = quantized_and_dense()
    q, d = same_adapter(model, dense, lora())
    x = model_input("llama")
    with torch.no_grad():
        expected = d(input_ids=x).logits
        assert torch.equal(q(input_ids=x).logits, expected)
    with pytest.raises(AdapterStateError, match="re-quantizing"):
        q.merge()
    merged = q.merge_and_unload()
    assert not any(isinstance(m, NF4Linear) for m in merged.model.layers[0].self_attn.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-5, rtol=1e-4)


def test_generation_on_a_4bit_base_takes_the_fast_path_and_leaves_the_codes_alone() -> None:
    # Widths that are multiples of 64, so bitsandbytes' CPU inference kernel applies.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    quantize_model(model, compute_dtype=torch.float32)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    am = AdaptedModel.attach(model, lora())
    x = model_input("llama", batch=2) % 64
    with torch.no_grad():
        slow = am(input_ids=x).logits
        with fast_decoding(model):
            layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
            assert layers and all(m.kernel is not None for m in layers), "bitsandbytes' kernel, not a copy"
            fast = am(input_ids=x).logits
    # Another kernel over the same codes (it rounds through bf16): close, not equal.
    torch.testing.assert_close(fast, slow, atol=1e-2, rtol=1e-2)
    out = am.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, x.shape[1] + 4)
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n in codes)
    assert all(m.kernel is None and m.dense is None for m in model.modules() if isinstance(m, NF4Linear))
    am.train()
    am(input_ids=x).logits.sum().backward()  # and training afterwards still has its gradients
    assert all(p.grad is not None for p in am.adapter_state_dict("default").values())


def test_train_with_quantize_nf4_records_it_and_the_adapter_moves_between_forms(tiny_model_dir, tmp_path):
    data = make_data(tmp_path / "up.jsonl", n=16)
    values = {
        "base": str(tiny_model_dir), "data": str(data), "output_dir": str(tmp_path / "run"), "quantize": "nf4",
        "max_steps": 3, "batch_size": 4, "precision": "fp32", "progress": False, "tensorboard": False,
        "lora.r": 4, "lora.lora_alpha": 8, "val_fraction": 0.25, "eval_every": 3,
    }  # fmt: skip
    result = train(load_config(None, values))
    adapter = result.adapter_dir
    identity = AdapterIdentity.from_metadata(_metadata(adapter))
    assert identity.base_quantization == "nf4" and identity.method == "lora"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"  # plain PEFT LoRA

    full, _ = load_base(str(tiny_model_dir), dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"trained on the nf4 \(4-bit\) form .* full-precision form"):
        AdaptedModel.from_pretrained(full, adapter)  # a note, not a refusal
    four_bit, _ = load_base(str(tiny_model_dir), dtype=torch.float32, quantize="nf4")
    q = AdaptedModel.from_pretrained(four_bit, adapter)  # the form it trained on: no note
    assert q.base_fingerprint() == AdaptedModel(full).base_fingerprint()

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_model_dir), str(adapter), str(out), "--quantize", "nf4"]) == 0
    merged, _ = load_base(str(out), dtype=torch.float32)
    x = torch.arange(12).view(2, 6) % 30
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, q(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    # The commands that generate take the 4-bit base too.
    report = tmp_path / "eval.json"
    args = ["--base", str(tiny_model_dir), "--quantize", "nf4"]
    assert (
        main(["eval", str(data), *args, "--adapters", str(adapter), "--n", "4", "--json", str(report)]) == 0
    )
    rows = json.loads(report.read_text())
    assert rows and "base" in json.dumps(rows)
    assert (
        main(["generate", *args, "--adapter", str(adapter), "--max-new-tokens", "3", "--prompt", "up abc"])
        == 0
    )
    assert main(["generate", *args, "--max-new-tokens", "3", "--prompt", "up abc"]) == 0


def test_full_fine_tuning_refuses_a_4bit_base(tiny_model_dir, tmp_path) -> None:
    from peftkit import ConfigError

    with pytest.raises(ConfigError, match="quantize"):
        load_config(None, {"method": "full", "quantize": "nf4"})


def _metadata(adapter_dir) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return dict(f.metadata())


def test_an_hf_peft_lora_trained_on_a_bitsandbytes_4bit_base_loads_here_with_the_same_outputs(tmp_path):
    """transformers + bitsandbytes quantize the checkpoint to the same bytes as load_base(quantize=
    "nf4"), and an HF PEFT LoRA over that base gives the same outputs in peftkit."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    )
    ours, _ = load_base(str(tmp_path / "base"), dtype=torch.float32, quantize="nf4", tokenizer="optional")
    q_theirs = theirs.model.layers[1].mlp.down_proj.state_dict()
    q_ours = ours.model.layers[1].mlp.down_proj.state_dict()
    assert q_theirs.keys() == q_ours.keys()
    assert all(torch.equal(q_theirs[k], q_ours[k]) for k in q_ours if q_ours[k].dtype != torch.float32)

    torch.manual_seed(1)
    pm = get_peft_model(
        theirs, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    pm.train()  # bitsandbytes' training path (its eval kernel would repack the weights)
    x = torch.arange(12).view(2, 6) * 5 % 64
    with torch.no_grad():
        expected = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "adapter")
    am = AdaptedModel.from_pretrained(ours, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(am(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
