"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): P
trainable embeddings, soft tokens, in front of every input; the base model is untouched.

peftkit feeds the soft tokens as a key/value prefix (`peftkit.core.kv_prefix`): once per call they run
through the model at positions 0..P-1, and the real tokens attend to their keys and values. For the
real tokens that is exactly HF PEFT's concatenation of embeddings (tests compare the logits); the
logits cover the real tokens only, where PEFT's carry P extra positions in front.

Field names and the file (one tensor, `prompt_embeddings` (P, hidden)) are HF PEFT's; what it shares
with prefix tuning (fields, checks, the model's geometry, the file) is in `virtual_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit.methods.virtual_tokens as virtual_tokens

from ..core.kv_prefix import KV, Geometry, cache_argument, check_no_checkpointing, model_geometry
from ..errors import ConfigError, PeftkitError, RequestError, ShapeMismatchError
from .config_fields import check, config_field, method_config
from .spec import MethodSpec
from .virtual_tokens import GEOMETRY, check_common, check_geometry, geometry_field

ROLE = "prompt_embeddings"  # the file key (bare, as HF PEFT stores it) and the tensor's role
INIT_CHOICES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


# -- the config -------------------------------------------------------------------------------------
@method_config("prompt tuning")
@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning: P soft tokens (trainable embeddings) in front of every input.

    Frozen and checked on construction (`prompt_tuning_init` upper-cased: 'text' in YAML means TEXT).
    """

    num_virtual_tokens: int = config_field(20, "soft tokens in front of every input (the prompt's length P)")
    prompt_tuning_init: str = config_field(
        "RANDOM",
        "how the soft tokens start: 'RANDOM' (normal, std 1, as in HF PEFT), 'SAMPLE_VOCAB' (embeddings "
        "of random vocabulary tokens) or 'TEXT' (embeddings of prompt_tuning_init_text's tokens, repeated "
        "or cut to num_virtual_tokens)",
    )
    prompt_tuning_init_text: str | None = config_field(
        None, "with prompt_tuning_init TEXT: the text whose token embeddings start the prompt"
    )
    tokenizer_name_or_path: str | None = config_field(
        None,
        "with prompt_tuning_init TEXT: the tokenizer for the text, a peftkit base model name (e.g. "
        "'smollm2-135m') or a model or tokenizer directory; use the base model's own",
    )
    token_dim: int | None = geometry_field("the hidden size")
    num_layers: int | None = geometry_field("its transformer layers")
    num_attention_heads: int | None = geometry_field("its query heads")
    num_transformer_submodules: int | None = geometry_field("1 for a decoder")

    def __post_init__(self) -> None:
        if isinstance(self.prompt_tuning_init, str):  # 'text' in a YAML file means TEXT
            object.__setattr__(self, "prompt_tuning_init", self.prompt_tuning_init.upper())
        check_common(self)
        init = self.prompt_tuning_init
        check(init in INIT_CHOICES, "prompt_tuning_init", init, f"one of {', '.join(INIT_CHOICES)}")
        for key in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            value = getattr(self, key)
            check(value is None or isinstance(value, str), key, value, "a string, or null")
        if init == "TEXT":
            text, tok = self.prompt_tuning_init_text, self.tokenizer_name_or_path
            words = (
                "a non-empty text with prompt_tuning_init TEXT (the words whose embeddings start the prompt)"
            )
            check(bool(text and text.strip()), "prompt_tuning_init_text", text, words)
            tokenizer = (
                "the base model's name or directory with prompt_tuning_init TEXT (its tokenizer turns "
                "prompt_tuning_init_text into token ids), e.g. 'smollm2-135m'"
            )
            check(bool(tok), "tokenizer_name_or_path", tok, tokenizer)


def prompt_geometry(g: Geometry) -> dict[str, int]:
    """The geometry fields of a prompt-tuning file for a model (HF PEFT's values: query heads)."""
    return virtual_tokens.file_geometry(g.hidden, g.layers, g.heads)


# -- the adapter ------------------------------------------------------------------------------------
class PromptEmbedding(nn.Module):
    """P soft-token embeddings; their keys and values are what the model computes for them."""

    def __init__(self, weight: Tensor, geometry: dict[str, int]) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(weight)  # (P, H)
        self.geometry = geometry  # the file's geometry fields, from the model it was made for

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {ROLE: self.prompt_embeddings}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.prompt_embeddings.copy_(tensors[ROLE])

    def prefix_kv(self, model: nn.Module) -> KV:
        """Run the soft tokens through the model (positions 0..P-1, no mask) and keep each layer's keys
        and values; with gradients, so training reaches the embeddings through them."""
        check_no_checkpointing(model)
        backbone = getattr(model, "base_model", model)  # the decoder without its head: no logits to compute
        embeds = self.prompt_embeddings.to(virtual_tokens.model_dtype(model))[None]  # (1, P, H)
        out = backbone(inputs_embeds=embeds, use_cache=True)
        cache = getattr(out, cache_argument(backbone), None)  # outputs name the cache as the forward does
        if cache is None:
            raise RequestError(f"{type(backbone).__name__} returned no key/value cache for the soft prompt")
        return [(keys[0], values[0]) for keys, values, *_ in cache]  # per layer (H_kv, P, D)


def make_adapter(model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
    """A new prompt for `model`, initialised as `config.prompt_tuning_init` says."""
    geometry = prompt_geometry(model_geometry(model))
    check_geometry(config, geometry, model, "prompt tuning", ConfigError)
    embeddings = virtual_tokens.input_embeddings(model)
    with torch.no_grad():
        weight = initial_prompt(config, embeddings, geometry["token_dim"])  # (P, H)
    return PromptEmbedding(weight.detach().clone(), geometry)


def initial_prompt(config: PromptTuningConfig, embeddings: nn.Module, hidden: int) -> Tensor:
    """The starting soft tokens (P, H), in the embeddings' dtype and device (HF PEFT's rules)."""
    n, weight = config.num_virtual_tokens, embeddings.weight
    if config.prompt_tuning_init == "RANDOM":  # nn.Embedding's own init, as HF PEFT leaves it
        return torch.randn(n, hidden).to(device=weight.device, dtype=weight.dtype)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, weight.shape[0], (n,))
    else:
        assert config.tokenizer_name_or_path is not None and config.prompt_tuning_init_text is not None
        ids = torch.tensor(text_ids(config.prompt_tuning_init_text, config.tokenizer_name_or_path, n))
        if int(ids.max()) >= weight.shape[0]:
            raise ConfigError(
                f"tokenizer_name_or_path {config.tokenizer_name_or_path!r} gives token id {int(ids.max())}, "
                f"beyond this model's {weight.shape[0]} embeddings: use the base model's own tokenizer"
            )
    return F.embedding(ids.to(weight.device), weight)


def text_ids(text: str, tokenizer_name: str, n: int) -> list[int]:
    """The text's token ids (special tokens included, as HF PEFT tokenizes it) cut or repeated to n."""
    ids = load_tokenizer(tokenizer_name)(text)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {text!r} gives no tokens with {tokenizer_name!r}")
    return (ids * math.ceil(n / len(ids)))[:n]


def load_tokenizer(name: str) -> Any:
    """A tokenizer by peftkit base name, model or tokenizer directory, GGUF file or hub id."""
    from ..base import load_base

    path = Path(name).expanduser()
    try:
        if path.is_dir():  # a directory's tokenizer alone (a tokenizer-only directory, as HF PEFT accepts)
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        return load_base(name, device="cpu")[1]
    except (PeftkitError, OSError, ValueError) as e:
        raise ConfigError(
            f"tokenizer_name_or_path {name!r} gives no tokenizer for prompt_tuning_init TEXT ({e}); set it "
            "to the base model's name (e.g. 'smollm2-135m') or a directory with its tokenizer files"
        ) from None


def expected_shapes(model: nn.Module, config: PromptTuningConfig) -> dict[str, tuple[int, ...]]:
    """The file's tensor shape for `model`, after checking the file's geometry against the model."""
    geometry = prompt_geometry(model_geometry(model))
    check_geometry(config, geometry, model, "prompt tuning", ShapeMismatchError)
    return {ROLE: (config.num_virtual_tokens * geometry["num_transformer_submodules"], geometry["token_dim"])}


# -- the file and `peftkit info` --------------------------------------------------------------------
def config_to_file(config: PromptTuningConfig, adapter: PromptEmbedding | None = None) -> dict[str, Any]:
    """The prompt-tuning part of adapter_config.json, with the model's geometry when the adapter is
    given (HF PEFT fills geometry left null from the model it loads into)."""
    return virtual_tokens.config_to_file(
        config, None if adapter is None else adapter.geometry, {"tokenizer_kwargs": None}
    )


def config_from_file(data: dict[str, Any], source: Any) -> PromptTuningConfig:
    """A PromptTuningConfig from an adapter_config.json. The initialisation only chose starting values,
    which the file's tensor replaces: a loaded adapter is RANDOM-initialised and needs no tokenizer."""
    init_only = {
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    }
    loaded = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    ignored = init_only | {"modules_to_save"}
    return virtual_tokens.from_file(PromptTuningConfig, data, source, "prompt tuning", ignored, loaded)


def describe(config: PromptTuningConfig, tensors: dict[str, Tensor], modules: list[str]) -> dict[str, Any]:
    """Prompt tuning's facts: the prompt's length and width read from the tensor, geometry from the file."""
    shape = tuple(tensors[ROLE].shape) if ROLE in tensors else (config.num_virtual_tokens, config.token_dim)
    return {
        "num_virtual_tokens": shape[0],
        "token_dim": shape[1],
        **{key: getattr(config, key) for key in GEOMETRY if key != "token_dim"},
    }


def info_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """Prompt tuning's lines of the text report."""
    return [
        ("virtual tokens", f"{f['num_virtual_tokens']} soft tokens of width {f['token_dim']}"),
        *virtual_tokens.geometry_rows(f),
    ]


SPEC = MethodSpec(
    name="prompt",
    label="prompt tuning",
    description="P trainable soft-token embeddings in front of every input; nothing to merge into weights",
    config_cls=PromptTuningConfig,
    peft_type="PROMPT_TUNING",
    # Two lengths, so the contract's mixed batches hold prompts of different lengths side by side.
    variants={"prompt": {}, "short": {"num_virtual_tokens": 3}},
    make_model_adapter=make_adapter,
    model_expected_shapes=expected_shapes,
    config_to_file=config_to_file,
    config_from_file=config_from_file,
    describe=describe,
    info_rows=info_rows,
    **virtual_tokens.SPEC_FLAGS,
)
