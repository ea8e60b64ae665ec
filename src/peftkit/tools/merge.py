"""Folding an adapter into its base model and writing a plain HF model directory (`peftkit merge`).

    merge_to_dir("smollm2-135m", "out/demo/adapter-best", "out/merged")

The result loads with `transformers.AutoModelForCausalLM.from_pretrained`, no peftkit needed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import RequestError
from ..paths import input_clash, input_paths


def _progress(message: str) -> None:
    print(f"peftkit: {message}", file=sys.stderr, flush=True)


def merge_to_dir(
    base: str,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    check_base: bool = True,
    quantize: str | None = None,
    registry: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Merge the adapter in `adapter_dir` into `base` and write the result to `out_dir`; return it.

    Everything that can be checked without the slow base-model load is checked first: that
    `out_dir` is neither an input nor inside or around one (`overwrite` would delete it), that it
    is empty unless `overwrite` is set (which replaces only a model directory, see
    `peftkit.base.save.check_model_out_dir`), that it is writable, and that the adapter files are
    readable. The tokenizer is
    copied when the base has one; a base saved without one (a plain `model.save_pretrained`) merges
    too, as with HF PEFT. check_base=False skips the base-fingerprint check. Progress goes to `log`
    (default: stderr).

    quantize="nf4" merges a QLoRA adapter into the base it trained on: the base is quantized as
    training quantized it, then dequantized, and the adapter merges into that full-precision copy
    (never re-quantized). The log reports how far the merged model's logits are from the unmerged
    4-bit model's on a probe batch. `dtype` "auto" merges in float32 and saves in the dtype the
    base's files are stored in; another dtype is the one to load, merge and save in.
    """
    log = log or _progress
    import torch

    from ..base import save_model_dir
    from ..base.save import check_model_out_dir
    from .opening import open_model, read_adapters

    out_dir = Path(out_dir)
    source = read_adapters([("default", adapter_dir)], registry)[0]  # a registry reference names files too
    check_out_dir(out_dir, input_paths(base, [source.directory]))
    check_model_out_dir(out_dir, overwrite=overwrite)  # not empty, not a model, not writable
    t0 = time.perf_counter()

    # auto: merged in float32, which every machine computes natively and which merges exactly, then
    # saved in the dtype the base's files are stored in (a bf16 checkpoint stays bf16 on disk).
    opened = open_model(
        base,
        [source],
        dtype="float32" if dtype == "auto" else dtype,
        tokenizer="optional",
        quantize=quantize,
        check_base=check_base,
        registry=registry,
        log=log,
    )
    log(f"loaded in {time.perf_counter() - t0:.1f} s")
    am, tokenizer = opened.model, opened.tokenizer
    stored = am.base.stored_dtype
    merged = merged_model(am, quantize, log)
    if dtype == "auto" and isinstance(stored, torch.dtype) and stored != torch.float32:
        merged.to(stored)
    log(
        f"merged; writing {out_dir}{' (the base has no tokenizer files to copy)' if tokenizer is None else ''} ..."
    )
    save_model_dir(merged, tokenizer, out_dir, overwrite=overwrite)
    log(f"done in {time.perf_counter() - t0:.1f} s: {out_dir}")
    return out_dir


def merged_model(am: object, quantize: str | None, log: Callable[[str], None]) -> object:
    """The merged plain model; over a 4-bit base, dequantized, with how far its logits moved said."""
    from ..core.layer_types import dequantize_model

    probe = _probe_ids(am.model) if quantize else None
    before = _logits(am, probe) if probe is not None else None
    merged = am.merge_and_unload()
    if quantize:
        dequantize_model(merged)
        diff = (_logits(merged, probe) - before).abs().max().item()
        log(
            f"merged into the dequantized {quantize} base; max |merged - unmerged| logit difference on a probe "
            f"batch: {diff:.3g} (logits span {before.abs().max().item():.3g})"
        )
    return merged


def _probe_ids(model: object) -> object:
    """A fixed batch of token ids for comparing outputs (2 x 32, spread over the vocabulary)."""
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    return (torch.arange(64).view(2, 32) * 7919 % vocab).long()


def _logits(model: object, ids: object) -> object:
    import torch

    device = next(model.parameters()).device  # the model may sit on a GPU; the probe is made on the CPU
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def check_out_dir(out_dir: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output directory that is an input, holds one or lies inside one: writing the merged
    model there (with --overwrite, replacing the directory) would destroy or alter the input."""
    clash = input_clash(out_dir, inputs)
    if clash:
        raise RequestError(
            f"the output directory {out_dir} {clash}; writing the merged model there would overwrite its "
            "input. Choose an output directory outside the base model and the adapter"
        )
