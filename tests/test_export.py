"""`peftkit export gguf` / `gguf-adapter` on tiny random models, checked in real llama.cpp.

Each architecture is a small random model with a byte-level BPE tokenizer, saved as an HF directory.
The merged export must give llama.cpp the logits peftkit computes with the adapter attached, and the
adapter export, applied by llama.cpp to the exported base, the same.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp_run import cpp_greedy, cpp_logits, llama, torch_greedy, torch_logits

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.export.gguf_adapter import export_adapter_gguf
from peftkit.export.gguf_model import export_model_gguf
from peftkit.tools.opening import open_model

PROMPT = [5, 17, 42, 100, 7, 250, 3, 9, 64, 128]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOUND = 1e-4  # max |logit difference|, f32 export against fp32 peftkit (measured: ~2e-6)
quiet = {"log": lambda message: None}


def bpe_tokenizer():
    """A byte-level BPE tokenizer (300 entries) with ChatML turn markers and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(
        ["The capital of France is Paris. 2024-01-15 is a date, hello world."] * 40, trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_config(kind: str, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    sizes = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)  # fmt: skip
    if kind == "llama3-rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # fmt: skip
        return LlamaConfig(**sizes, rope_parameters=rope)
    classes = {
        "llama": LlamaConfig,
        "llama-tied": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
    }
    if kind == "qwen3":
        return Qwen3Config(**sizes, head_dim=32)  # heads wider than hidden / n_head, with q/k norms
    return classes[kind](**sizes, tie_word_embeddings=kind == "llama-tied")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    tokenizer = bpe_tokenizer()
    dirs = {}
    for kind in ("llama", "llama-tied", "mistral", "qwen2", "qwen3", "llama3-rope"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer))).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[kind] = path
    return dirs


def save_adapter(base: Path, out: Path, config: object, seed: int = 1) -> Path:
    """A random adapter of `config` on `base` (B nonzero, so the update is not zero), saved to `out`."""
    am = open_model(str(base), [], adapted=True, dtype="float32").model
    am.add_adapter("x", config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if any(k in name for k in ("lora_B", "ia3_", "lora_magnitude")):
                p.add_(torch.randn_like(p) * 0.3)
    am.save_adapter(out, "x")
    return out


def attached(base: Path, adapter: Path) -> object:
    """peftkit's model with `adapter` attached (the reference every export is compared with)."""
    return open_model(str(base), [("a", adapter)], dtype="float32").model


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "llama3-rope"])
def test_a_merged_f32_export_gives_llama_cpp_peftkits_logits_and_tokens(model_dirs, tmp_path, kind):
    base = model_dirs[kind]
    adapter = save_adapter(
        base, tmp_path / "a", peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR)
    )
    out = export_model_gguf(str(base), [adapter], tmp_path / "m.gguf", qtype="f32", **quiet)
    reference = attached(base, adapter)
    with llama(out) as llm:
        diff = np.abs(cpp_logits(llm, PROMPT) - torch_logits(reference, PROMPT)).max()
        assert diff < BOUND, f"{kind}: max |logit diff| {diff}"
        assert cpp_greedy(llm, PROMPT, 12) == torch_greedy(reference, PROMPT, 12)


@pytest.mark.parametrize(
    "config",
    [
        peftkit.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LINEAR),
        peftkit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        peftkit.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ],
    ids=["dora", "rslora", "ia3"],
)
def test_every_mergeable_method_exports_merged(model_dirs, tmp_path, config):
    base = model_dirs["llama"]
    adapter = save_adapter(base, tmp_path / "a", config)
    out = export_model_gguf(str(base), [adapter], tmp_path / "m.gguf", qtype="f32", **quiet)
    with llama(out) as llm:
        diff = np.abs(cpp_logits(llm, PROMPT) - torch_logits(attached(base, adapter), PROMPT)).max()
    assert diff < BOUND


ADAPTERS = {
    "lora": {"r": 8, "lora_alpha": 16},
    "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True},
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"v_proj": 3.0, "k_proj": 40.0},
    },  # fmt: skip
}


@pytest.fixture(scope="module")
def base_f32(model_dirs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bases")
    return {
        kind: export_model_gguf(str(model_dirs[kind]), [], out / f"{kind}.gguf", qtype="f32", **quiet)
        for kind in ("llama", "qwen2")
    }


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_an_adapter_export_applied_by_llama_cpp_is_the_attached_adapter(
    model_dirs, base_f32, tmp_path, variant, kind
):
    """Each scaling (α/r, α/√r, per-layer rank and alpha) comes out right: llama.cpp scales a whole file
    by one alpha, so each layer's scale is in its B."""
    base = model_dirs[kind]
    adapter = save_adapter(
        base, tmp_path / "a", peftkit.LoraConfig(target_modules=LINEAR, **ADAPTERS[variant])
    )
    lora = export_adapter_gguf(adapter, tmp_path / "a.gguf", base=str(base), **quiet)
    reference = attached(base, adapter)
    with llama(base_f32[kind], lora=lora) as llm:
        diff = np.abs(cpp_logits(llm, PROMPT) - torch_logits(reference, PROMPT)).max()
        assert diff < BOUND, f"{variant}: max |logit diff| {diff}"
        assert cpp_greedy(llm, PROMPT, 12) == torch_greedy(reference, PROMPT, 12)
    with llama(base_f32[kind]) as llm:  # and without it, the base: the adapter did change the logits
        assert np.abs(cpp_logits(llm, PROMPT) - torch_logits(reference, PROMPT)).max() > 100 * BOUND


def test_adapter_types_f16_and_q8_0_load_and_stay_close(model_dirs, base_f32, tmp_path):
    base = model_dirs["llama"]
    adapter = save_adapter(
        base, tmp_path / "a", peftkit.LoraConfig(r=32, lora_alpha=32, target_modules=LINEAR)
    )
    reference = torch_logits(attached(base, adapter), PROMPT)
    for qtype, bound in (("f16", 0.02), ("q8_0", 0.1)):
        lora = export_adapter_gguf(adapter, tmp_path / f"{qtype}.gguf", base=str(base), qtype=qtype, **quiet)
        with llama(base_f32["llama"], lora=lora) as llm:
            assert np.abs(cpp_logits(llm, PROMPT) - reference).max() < bound, qtype


def test_the_vocabulary_written_from_an_hf_tokenizer_tokenizes_as_it_does(model_dirs, base_f32):
    tokenizer = bpe_tokenizer()
    text = "The capital of France is Paris, said 2024-01-15. hello <|im_end|>"
    with llama(base_f32["llama"]) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
        assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id


def test_the_modelfile_names_the_exports_template_and_stops(model_dirs, base_f32, tmp_path, capsys):
    base = model_dirs["llama"]
    adapter = save_adapter(base, tmp_path / "a", peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert (
        main(
            [
                "export",
                "gguf",
                str(base),
                str(adapter),
                str(tmp_path / "m.gguf"),
                "--type",
                "f32",
                "--modelfile",
            ]
        )
        == 0
    )
    merged = (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./m.gguf\n" in merged and "ADAPTER" not in merged
    assert 'PARAMETER stop "<|im_end|>"' in merged
    assert '{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}' in merged
    assert merged.count("{{ range .Messages }}") == 1 and merged.rstrip().endswith(
        'PARAMETER stop "<|im_end|>"'
    )
    out = tmp_path / "lora.gguf"
    assert main(["export", "gguf-adapter", str(adapter), str(out), "--base", str(base), "--modelfile"]) == 0
    text = (tmp_path / "lora.Modelfile").read_text()
    assert f"ADAPTER ./{out.name}\n" in text and f"FROM ./{base.name}.gguf\n" in text
    assert (
        f"peftkit export gguf {base} {tmp_path / (base.name + '.gguf')}" in text
    )  # how to write FROM's file
    assert f"wrote {out} and {tmp_path / 'lora.Modelfile'}" in capsys.readouterr().out
    with llama(tmp_path / "m.gguf") as merged_llm, llama(base_f32["llama"], lora=out) as lora_llm:
        assert cpp_greedy(merged_llm, PROMPT, 8) == cpp_greedy(lora_llm, PROMPT, 8)  # the files it names run


@pytest.mark.parametrize(
    ("config", "what"),
    [
        (peftkit.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), "DoRA"),
        (peftkit.IA3Config(target_modules=["v_proj"], feedforward_modules=[]), "IA³"),
        (peftkit.PromptTuningConfig(num_virtual_tokens=4), "prompt"),
        (peftkit.BottleneckConfig(), "ottleneck"),
        (peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ],
    ids=["dora", "ia3", "prompt", "bottleneck", "modules_to_save"],
)
def test_methods_llama_cpp_cannot_apply_are_refused_naming_the_merged_export(
    model_dirs, tmp_path, capsys, config, what
):
    adapter = save_adapter(model_dirs["llama"], tmp_path / "a", config)
    out = tmp_path / "a.gguf"
    assert main(["export", "gguf-adapter", str(adapter), str(out), "--base", str(model_dirs["llama"])]) == 2
    err = capsys.readouterr().err
    assert what in err and f"peftkit export gguf BASE {adapter} OUT.gguf" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_inputs_are_refused_before_any_work(model_dirs, tmp_path, capsys):
    from conftest import tiny_gpt2

    llama_dir = model_dirs["llama"]
    adapter = save_adapter(llama_dir, tmp_path / "a", peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"mine")
    cases = [
        (
            ["gguf", str(gpt2), str(tmp_path / "g.gguf")],
            "does not support GPT2LMHeadModel; it writes LlamaForCausalLM",
        ),
        (["gguf", str(llama_dir), str(tmp_path / "m.gguf"), "--type", "q4_k"], "llama-quantize"),
        (["gguf", str(llama_dir), str(existing)], "exists; choose another name or pass --overwrite"),
        (["gguf", str(llama_dir), str(llama_dir / "inside.gguf")], "is inside the base model directory"),
        (["gguf", str(llama_dir), str(adapter), str(adapter / "x.gguf")], "is inside the adapter directory"),
        (["gguf", str(llama_dir), str(tmp_path / "m.bin")], "must be a .gguf file name"),
        (
            ["gguf-adapter", str(adapter), str(tmp_path / "a.gguf"), "--base", str(model_dirs["qwen2"])],
            "base",
        ),
        (["gguf-adapter", str(adapter), str(tmp_path / "a.gguf"), "--type", "q4_0"], "(f32, f16, q8_0)"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    assert existing.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "exists.gguf", "gpt2"]  # nothing written
    with pytest.raises(PeftkitError, match="different base|another base|fingerprint"):
        export_adapter_gguf(adapter, tmp_path / "a.gguf", base=str(model_dirs["qwen2"]), **quiet)


def test_a_full_disk_mid_write_leaves_no_file_under_the_final_name(model_dirs, tmp_path):
    """A real write failure: the file size limit (RLIMIT_FSIZE) stops the export's writes at 100 kB,
    as a full disk would (the kernel refuses the write; Python ignores SIGXFSZ, so it is an OSError)."""
    out = tmp_path / "m.gguf"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    code = "from peftkit.cli import main; raise SystemExit(main(['export', 'gguf', *__import__('sys').argv[1:]]))"
    run = subprocess.run([sys.executable, "-c", code, str(model_dirs["llama"]), str(out), "--type", "f32"],
                         capture_output=True, text=True, preexec_fn=limit, timeout=300)  # fmt: skip
    assert run.returncode == 2 and f"writing {out} failed" in run.stderr and "disk full" in run.stderr, (
        run.stderr
    )
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary sibling


def test_the_cli_takes_adapters_between_the_base_and_the_output(model_dirs, tmp_path, capsys):
    base = model_dirs["llama"]
    a1 = save_adapter(base, tmp_path / "a1", peftkit.LoraConfig(r=4, target_modules=["q_proj"]), seed=1)
    a2 = save_adapter(base, tmp_path / "a2", peftkit.LoraConfig(r=4, target_modules=["v_proj"]), seed=2)
    out = tmp_path / "two.gguf"
    assert (
        main(["export", "gguf", str(base), str(a1), str(a2), str(out), "--type", "F32"]) == 0
    )  # as llama.cpp spells it
    reference = open_model(str(base), [("a1", a1), ("a2", a2)], dtype="float32").model
    reference.set_adapter(["a1", "a2"])
    with llama(out) as llm:
        assert np.abs(cpp_logits(llm, PROMPT) - torch_logits(reference, PROMPT)).max() < BOUND
    assert f"wrote {out}" in capsys.readouterr().out
