"""Writing a model and tokenizer as a plain HF model directory that transformers loads on its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftkit.base.cache import building_dir, is_nonempty_dir
from peftkit.errors import BaseModelError, option
from peftkit.io import umask_mode, unwritable_reason


def is_gguf_dequantized(model: PreTrainedModel) -> bool:
    """True for a model transformers loaded from a GGUF file.

    Its weights are already dequantized to ordinary float tensors, but transformers still flags
    it as quantized (config.quantization_config plus model.hf_quantizer), and so refuses
    `save_pretrained`.
    """
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    # QuantizationMethod is a str enum, so this matches both the enum and a plain "gguf".
    return method == "gguf"


@contextmanager
def gguf_flag_cleared(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, a GGUF-loaded model is not flagged as quantized; the flag is restored after.

    Only the GGUF flag is touched: other quantizers (bitsandbytes, ...) hold packed weights whose
    config must stay with them.
    """
    if not is_gguf_dequantized(model):
        yield
        return
    saved = (model.config.quantization_config, getattr(model, "hf_quantizer", None))
    del model.config.quantization_config
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.config.quantization_config, model.hf_quantizer = saved


def save_model_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `model` and `tokenizer` to `out_dir` as a plain HF model directory; return its path.

    The directory holds safetensors weights, config.json, generation_config.json and the tokenizer
    files (chat template included; none when `tokenizer` is None), so
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads it without peftkit. It is built in a
    temporary sibling directory and renamed into place, so a crash never leaves half a model. An
    existing non-empty `out_dir` is an error unless `overwrite` is set, and even then only a model
    directory is replaced (see `check_model_out_dir`). Files get the usual umask permissions (others
    can read a model that is shared, as with adapters).
    """
    out = Path(out_dir).expanduser()
    check_model_out_dir(out, overwrite=overwrite)
    try:
        with (
            building_dir(out, if_exists="replace" if overwrite else "error") as tmp,
            gguf_flag_cleared(model),
        ):
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _umask_permissions(tmp)
    except FileExistsError as err:
        raise BaseModelError(f"cannot save the model to {out}: {err}") from err
    return out


def check_model_out_dir(out: Path, *, overwrite: bool = False) -> None:
    """Refuse, before any slow work, a place `save_model_dir` could not or must not write a model to.

    A non-empty directory needs `overwrite`, and even then is replaced (deleted whole) only when it
    holds a model (config.json and weights): never a directory of other files, the home directory,
    the filesystem root, or a directory that holds the current working directory or the home
    directory. The location must be writable (probed, so a read-only place fails for root too).
    """
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise BaseModelError(f"cannot save the model to {out}: it exists and is not a directory")
    cwd = Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents):  # even empty: the shell would be left in a deleted directory
        raise BaseModelError(
            f"refusing to replace {out}: it is or holds the current working directory; give the model a "
            "directory of its own"
        )
    if is_nonempty_dir(out):
        if not overwrite:
            raise BaseModelError(
                f"cannot save the model to {out}: the directory exists and is not empty; pass "
                f"{option('overwrite')} to replace the model there, or choose another directory"
            )
        _check_replaceable(out)
    # The model is built in a sibling and renamed into place; replacing also deletes what `out` holds.
    for place in (out.parent, out) if is_nonempty_dir(out) else (out.parent,):
        reason = unwritable_reason(place)
        if reason:
            raise BaseModelError(f"cannot save the model to {out}: {reason}")


def holds_model(directory: Path) -> bool:
    """Whether `directory` holds a saved model: a config.json and a weights file."""
    weights = (".safetensors", ".bin", ".index.json", ".gguf")
    return (directory / "config.json").is_file() and any(
        p.is_file() and p.name.endswith(weights) for p in directory.iterdir()
    )


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory whose loss would go beyond an old model."""
    resolved = out.resolve()
    home = Path.home().resolve()
    if resolved in (home, *home.parents):  # the root among them (the working directory is refused before)
        raise BaseModelError(
            f"refusing to replace {out}: it is or holds your home directory; give the model a directory of its own"
        )
    if not holds_model(out):
        raise BaseModelError(
            f"refusing to replace {out}: it is not empty and holds no saved model (no config.json with "
            "weights), so replacing it would delete other files; choose a new or empty directory"
        )


def _umask_permissions(directory: Path) -> None:
    """Give every file in `directory` the mode a plain `open` would: safetensors writes its files
    through a private temporary file (mode 0600), which would keep a merged model from other users."""
    mode = umask_mode(directory)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
