"""The tokenizer as GGUF metadata: its tokens, merges, special tokens and chat template.

    write_vocab(writer, tokenizer, vocab_size, source_gguf=None)

A base that was itself a GGUF file (the built-in model) keeps its tokenizer metadata exactly as that
file has it: every `tokenizer.*` key is copied. Otherwise the HF tokenizer is described: llama.cpp's
"gpt2" model (byte-level BPE: Llama 3, SmolLM, Qwen2/3, Mistral Nemo), with the pre-tokenizer named
from its split rules. SentencePiece-style vocabularies are refused with the way out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RequestError

# llama.cpp's token types (its llama_token_type): what each vocabulary entry is.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Pre-tokenizer regexes of the common byte-level BPE families -> llama.cpp's name for that
# pre-tokenizer (`tokenizer.ggml.pre`). A family is told apart by how it splits digits and letters.
_PRE_BY_PATTERN = {
    r"\p{N}{1,3}": "llama-bpe",  # Llama 3: numbers in groups of up to three digits
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|": "qwen2",  # Qwen2/3: one digit at a time
}


def write_vocab(writer: Any, tokenizer: Any, vocab_size: int, source_gguf: Path | None) -> None:
    """Write the tokenizer metadata: copied from `source_gguf` when the base came from one, else
    described from the HF `tokenizer`, padded with unused entries to the model's `vocab_size`."""
    if source_gguf is not None:
        copy_tokenizer_keys(writer, source_gguf)
        return
    if tokenizer is None:
        raise RequestError(
            "the base has no tokenizer files; llama.cpp needs the tokenizer in the GGUF file. Save the "
            "tokenizer into the base model's directory (tokenizer.save_pretrained(DIR)) and export again"
        )
    described = describe_tokenizer(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(described["pre"])
    writer.add_token_list(described["tokens"])
    writer.add_token_types(described["types"])
    writer.add_token_merges(described["merges"])
    for key, token_id in described["special"].items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(described["add_bos"])
    if described["chat_template"]:
        writer.add_chat_template(described["chat_template"])


def describe_tokenizer(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The GGUF description of a byte-level BPE HF tokenizer (tokens by id, their types, the merges,
    the special token ids, whether a BOS is prepended, the chat template, the pre-tokenizer name)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(pre):
        kind = model.get("type") or type(tokenizer).__name__
        raise RequestError(
            f"the GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen2/3); this base's is "
            f"{kind}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}. "
            "Convert it with llama.cpp's convert_hf_to_gguf.py, or export a base whose tokenizer is byte-level BPE"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise RequestError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary has {vocab_size} "
            "entries; the tokenizer and the model do not belong together"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id], types[token_id] = token, NORMAL
    for token_id, added in tokenizer.added_tokens_decoder.items():
        types[token_id] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        key: getattr(tokenizer, f"{attr}_token_id", None)
        for key, attr in (("bos", "bos"), ("eos", "eos"), ("unk", "unk"), ("pad", "pad"))
    }
    encoded = tokenizer("a", add_special_tokens=True)["input_ids"]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "special": {key: value for key, value in special.items() if value is not None},
        "add_bos": special["bos"] is not None and encoded[:1] == [special["bos"]],
        "chat_template": template,
        "pre": pre_tokenizer_name(pre),
    }


def pre_tokenizer_name(pre: dict[str, Any]) -> str:
    """llama.cpp's name for an HF byte-level pre-tokenizer (its split regex and digit rule)."""
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    patterns = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    for needle, name in _PRE_BY_PATTERN.items():
        if any(needle in pattern for pattern in patterns):
            return name
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM: each digit alone, then GPT-2's split
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    return "default"


def copy_tokenizer_keys(writer: Any, source: Path) -> None:
    """Copy every `tokenizer.*` key of the GGUF file `source`, with its exact value type."""
    import gguf

    reader = gguf.GGUFReader(source)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
