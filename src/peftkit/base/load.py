"""`load_base`: a causal LM and its tokenizer from a built-in name, a GGUF file, a directory or the hub.

GGUF files are converted once (dequantizing takes ~20 s) into a float32 safetensors directory in
the cache; every later load reads that directory (about a second). Each checkpoint's fingerprint
is computed once and kept in a JSON sidecar, so adapters can check their base without rehashing.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftkit.base.cache import (
    building_dir,
    dir_identity,
    read_json,
    resolve_cache_dir,
    short_hash,
    write_json_atomic,
)
from peftkit.base.catalog import DEFAULT_BASE
from peftkit.base.facts import base_facts
from peftkit.base.fingerprint import is_fingerprint, model_fingerprint
from peftkit.base.precision import compute_dtype
from peftkit.base.save import gguf_flag_cleared
from peftkit.base.sources import hub_failure_message, hub_unreachable_reason, resolve_source
from peftkit.errors import BaseModelError

SIDECAR_NAME = "peftkit_fingerprint.json"
"""The fingerprint sidecar inside a converted checkpoint directory."""

# Files a saved tokenizer leaves in a model directory (one is enough: tokenizer.json for fast
# tokenizers, tokenizer_config.json for every save_pretrained, the others for slow vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

QUANTIZATIONS = (None, "nf4")
"""The values `load_base(quantize=...)` accepts."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device; None means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BaseModelError(f"unknown device {device!r}: {err}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {device!r} was asked for, but this torch sees no CUDA GPU; use 'cpu'")
    return resolved


@overload
def load_base(
    name_or_path: str = ...,
    *,
    dtype: torch.dtype | str | None = ...,
    device: str | torch.device | None = ...,
    cache_dir: str | Path | None = ...,
    tokenizer: Literal["required"] = ...,
    quantize: str | None = ...,
    dtype_advice: str | None = ...,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]: ...


@overload
def load_base(
    name_or_path: str = ...,
    *,
    dtype: torch.dtype | str | None = ...,
    device: str | torch.device | None = ...,
    cache_dir: str | Path | None = ...,
    tokenizer: Literal["optional"],
    quantize: str | None = ...,
    dtype_advice: str | None = ...,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]: ...


def load_base(
    name_or_path: str = DEFAULT_BASE,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    tokenizer: Literal["required", "optional"] = "required",
    quantize: str | None = None,
    dtype_advice: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer, in eval mode, with its fingerprint attached.

    `name_or_path` is a built-in name (see BUILTIN_MODELS), a .gguf file, a local HF model
    directory (one with config.json), or a Hugging Face hub id. `dtype` None or "auto" is bf16 where
    the device computes it natively and float32 elsewhere, whatever the checkpoint's own dtype (see
    `peftkit.base.precision`); `device` None means CUDA when available.
    `cache_dir` defaults to `default_cache_dir()`. `tokenizer="optional"` loads a model directory
    that has no tokenizer files (a plain `model.save_pretrained`) with tokenizer None, for work that
    needs no text (merging); by default such a directory is an error that says how to add one.

    `quantize="nf4"` stores every linear layer except the output head as a frozen 4-bit
    `NF4Linear` (see `peftkit.base.nf4`), computing in the loaded dtype (bf16 for a float16 load);
    None keeps the weights as loaded.

    A `dtype` this device does not compute natively is loaded with a one-line warning saying how much
    slower it is and how to choose float32: `dtype_advice` for a command whose users set the dtype
    under another name than --dtype (e.g. "set precision: fp32 (or auto)").

    The model carries its `BaseFacts` (`peftkit.base.facts`, read with `base_facts(model)`): the
    fingerprint (see `model_fingerprint`), the name (`name_or_path` as given), the quantization
    (`quantize`) and the stored dtype (the dtype of the checkpoint's files, whatever it was loaded in). The fingerprint is the
    checkpoint's, taken before quantizing, so an adapter trained on the 4-bit base matches the
    full-precision one. The tokenizer gets the eos token as pad token if it has none; nothing
    else is changed.
    """
    if quantize not in QUANTIZATIONS:
        valid = ", ".join(repr(q) for q in QUANTIZATIONS)
        raise BaseModelError(f"unknown quantize {quantize!r}; valid: {valid}")
    target = resolve_device(device)
    torch_dtype = compute_dtype(dtype, target, dtype_advice)
    root = resolve_cache_dir(cache_dir)
    source = resolve_source(name_or_path)
    if source.kind == "hub":
        model, tok = _load_from_hub(source.location, torch_dtype, root)
    else:
        if source.kind == "dir":
            model_dir = Path(source.location)
            sidecar = root / "fingerprints" / f"{short_hash(dir_identity(model_dir))}.json"
        else:
            assert source.cache_name is not None  # set for every GGUF source
            model_dir = _converted_gguf_dir(Path(source.location), root / "models" / source.cache_name)
            sidecar = model_dir / SIDECAR_NAME
        tok = _load_tokenizer(model_dir, optional=tokenizer == "optional")
        model = _load_model(model_dir, torch_dtype)
        base_facts(model).stored_dtype = stored_dtype(model_dir / "config.json")
        _attach_fingerprint(model, sidecar, lambda: _load_model(model_dir, "auto"), torch_dtype)
    if tok is not None:
        _ensure_pad_token(tok)
    if quantize == "nf4":
        # Before the move: the float weights never reach the GPU, and the codes are those of the
        # CPU algorithm whatever the device (bitsandbytes' CUDA kernels may round differently).
        from peftkit.base.nf4 import quantize_model

        if quantize_model(model) == 0:  # e.g. GPT-2, whose layers are transformers' Conv1D
            raise BaseModelError(
                f"quantize='nf4' found no nn.Linear layers (other than the output head) in "
                f"{name_or_path}; NF4 replaces nn.Linear only. Load it without quantize"
            )
    model.to(target)
    model.eval()
    facts = base_facts(model)
    facts.name, facts.quantization = name_or_path, quantize
    return model, tok


def stored_dtype(config_json: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, from its config.json ("dtype", or the older
    "torch_dtype"); float32 when it says none (loading changes `model.config.dtype`, so it is read
    here, from the file)."""
    config = read_json(config_json) or {}
    name = config.get("dtype") or config.get("torch_dtype")
    found = getattr(torch, name, None) if isinstance(name, str) else None
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


def _load_model(model_dir: Path, dtype: torch.dtype | Literal["auto"]) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise BaseModelError(f"cannot load the model in {model_dir}: {type(err).__name__}: {err}") from err


def _load_tokenizer(model_dir: Path, *, optional: bool = False) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer; None when it has no tokenizer files and `optional` is set."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        if optional:
            return None
        # Checked first: without the files, transformers tries to build a tokenizer from the model
        # config and fails with an unrelated complaint (e.g. that sentencepiece is not installed).
        raise BaseModelError(
            f"no tokenizer files in {model_dir}; save the tokenizer there with "
            f"tokenizer.save_pretrained({str(model_dir)!r})"
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        raise BaseModelError(
            f"cannot load the tokenizer in {model_dir}: {type(err).__name__}: {err}"
        ) from err


def _converted_gguf_dir(gguf: Path, entry: Path) -> Path:
    """The cache directory holding `gguf` converted to float32 safetensors; converts on first use."""
    if (entry / "config.json").is_file() and (entry / SIDECAR_NAME).is_file():
        return entry
    print(
        f"peftkit: converting {gguf.name} to a float32 checkpoint in {entry} (once, ~20 s)", file=sys.stderr
    )
    # A half-deleted entry (no sidecar, which is written last) is rebuilt; a missing one is built,
    # and if another process finishes first, its copy is kept.
    with building_dir(entry, if_exists="replace" if entry.exists() else "keep") as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise BaseModelError(f"cannot read the GGUF file {gguf}: {type(err).__name__}: {err}") from err
        with gguf_flag_cleared(model):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_sidecar(tmp / SIDECAR_NAME, model_fingerprint(model), str(gguf))
    return entry


def _attach_fingerprint(
    model: PreTrainedModel,
    sidecar: Path | None,
    load_reference: Callable[[], PreTrainedModel],
    dtype: torch.dtype | Literal["auto"],
) -> None:
    """Set the model's fingerprint from the sidecar, computing and storing it when missing."""
    stored = read_json(sidecar) if sidecar is not None else None
    if stored is not None and is_fingerprint(stored.get("fingerprint")):
        base_facts(model).fingerprint = stored["fingerprint"]
        return
    if dtype in ("auto", torch.float32, torch.bfloat16):
        # Rounding to bfloat16 gives the same bytes from a float32, bfloat16 or native load.
        fingerprint = model_fingerprint(model, refresh=True)
    else:
        # A float16 load has lost bits (and range) that a bfloat16 rounding of the checkpoint
        # keeps, so the identity is taken from a CPU load in the checkpoint's own dtype.
        fingerprint = model_fingerprint(load_reference())
        base_facts(model).fingerprint = fingerprint
    if sidecar is not None:
        _try_write_sidecar(sidecar, fingerprint, str(getattr(model.config, "_name_or_path", "")))


def _write_sidecar(path: Path, fingerprint: str, source: str) -> None:
    write_json_atomic(path, {"fingerprint": fingerprint, "source": source, "format": 1})


def _try_write_sidecar(path: Path, fingerprint: str, source: str) -> None:
    # The model is loaded and fingerprinted already; a read-only cache only costs a recompute next time.
    try:
        _write_sidecar(path, fingerprint, source)
    except OSError as err:
        warnings.warn(f"peftkit: could not store the fingerprint in {path}: {err}", stacklevel=3)


def _load_from_hub(
    repo_id: str, dtype: torch.dtype | Literal["auto"], root: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline_reason = hub_unreachable_reason()
    kwargs: dict[str, Any] = {"local_files_only": offline_reason is not None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, **kwargs)
    except Exception as err:  # hub errors span OSError, ValueError and huggingface_hub's own types
        raise BaseModelError(hub_failure_message(repo_id, err, offline_reason)) from err
    # A hub snapshot is immutable, so its commit hash keys the sidecar; without one, no sidecar.
    commit = getattr(model.config, "_commit_hash", None)
    sidecar = root / "fingerprints" / f"hub-{short_hash(repo_id, commit)}.json" if commit else None
    base_facts(model).stored_dtype = getattr(AutoConfig.from_pretrained(repo_id, **kwargs), "dtype", None)
    reference = lambda: AutoModelForCausalLM.from_pretrained(repo_id, dtype="auto", **kwargs)
    _attach_fingerprint(model, sidecar, reference, dtype)
    return model, tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # Batching needs a pad token; reusing eos adds no token, so the embeddings keep their size.
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise BaseModelError(
            "the tokenizer has neither a pad token nor an eos token to use as one; "
            "set tokenizer.pad_token in the model directory's tokenizer_config.json"
        )
    tokenizer.pad_token = tokenizer.eos_token
