"""`peftkit info`, `merge`, `combine` and `compress`: parse, then call the tools in `peftkit.tools`."""

from __future__ import annotations

import json as _json
from pathlib import Path
from typing import Literal

from ..command_args import AdapterRegistry


def info(adapter_dir: Path, json: bool = False, registry: AdapterRegistry = None) -> None:
    """Describe a saved adapter: method, rank, alpha, targets, size, dtype and the base it was trained on.

    Reads the files only (no base model is loaded); works on adapters saved by peftkit and by HF PEFT.
    The rank is read from the tensors; a config that disagrees with them is reported.

    Args:
        adapter_dir: the adapter directory (adapter_config.json + adapter_model.safetensors)
        json: print the facts as one JSON object instead of text
    """
    from ..tools.info import adapter_info, format_info

    facts = adapter_info(adapter_dir, registry)
    print(_json.dumps(facts, indent=2) if json else format_info(facts))


def merge(
    base: str,
    adapter_dir: Path,
    out_dir: Path,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    overwrite: bool = False,
    check_base: bool = True,
    quantize: Literal["nf4"] | None = None,
    registry: AdapterRegistry = None,
) -> None:
    """Fold an adapter into its base model and write a plain HF model directory (with its tokenizer).

    The result loads with `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`, no peftkit
    needed. The adapter is checked against the base (fingerprint, names, shapes) before merging.
    A base directory without tokenizer files merges too (the output then has none either).

    Args:
        base: the base model: a built-in name (smollm2-135m), an HF model directory, or a .gguf file
        adapter_dir: the adapter directory to merge
        out_dir: where to write the merged model (not the base's or the adapter's directory)
        dtype: the dtype to load the base in and to save (auto: merged in float32, saved in the
            checkpoint's own dtype)
        overwrite: replace OUT_DIR if it holds a model (never a directory of other files, your home
            or the working directory)
        check_base: refuse an adapter whose recorded base fingerprint differs from this base's
            (--no-check-base merges it anyway; names and shapes are still checked)
        quantize: nf4: merge a QLoRA adapter into the base as it trained on: the 4-bit base,
            dequantized (the output is full precision; re-quantizing would lose the update). Prints
            how far the merged model's logits are from the unmerged 4-bit model's
    """
    from ..tools.merge import merge_to_dir

    merge_to_dir(
        base,
        adapter_dir,
        out_dir,
        dtype=dtype,
        overwrite=overwrite,
        check_base=check_base,
        quantize=quantize,
        registry=registry,
    )


def combine(
    out: Path,
    adapters: list[str] = [],  # noqa: B006 (argparse fills it; the function never mutates it)
    weights: list[float] = [],  # noqa: B006
    how: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"] = "svd",
    density: float | None = None,
    rank: int | None = None,
    base: str | None = None,
    seed: int | None = None,
    check_base: bool = True,
    registry: AdapterRegistry = None,
) -> None:
    """Combine LoRA adapters of one base into a new LoRA adapter, as HF PEFT's add_weighted_adapter does.

    linear/ties/dare_* merge the A and B factors (the adapters need one rank); cat puts them side by
    side (exact, rank = the sum); svd truncates the weighted sum of the deltas to --rank and prints
    its relative reconstruction error. docs/combine.md has the rules. Saved in the PEFT format.

    Args:
        out: the directory to write the new adapter to
        adapters: the LoRA adapter directories (or registry references) to combine
        weights: one weight per adapter (negative subtracts); unset, each adapter weighs 1
        how: how to combine them
        density: ties, dare_*: the fraction of each task tensor kept, in (0, 1]
        rank: svd: the new adapter's rank; unset, the largest input rank
        base: the base model; unset, the one the first adapter records
        seed: dare_*: seed for the random masks; unset, torch's global generator
        check_base: refuse adapters whose recorded base fingerprint differs from --base's
            (--no-check-base loads them anyway; names and shapes are still checked)
    """
    from ..tools.combine import combine_files

    result = combine_files(
        out,
        list(adapters),
        list(weights),
        how,
        density=density,
        rank=rank,
        base=base,
        seed=seed,
        check_base=check_base,
        registry=registry,
    )
    print(f"wrote {out}: {result.summary()}")


def compress(
    adapter_dir: Path,
    out: Path,
    rank: int | None = None,
    energy: float | None = None,
    dtype: Literal["fp16", "bf16"] | None = None,
    overwrite: bool = False,
    json: bool = False,
    registry: AdapterRegistry = None,
) -> None:
    """Reduce a LoRA adapter's rank by SVD and write the smaller adapter in the PEFT format.

    Each layer's update s·B·A is truncated to its largest singular values: at most --rank R of them, or
    the fewest that keep the fraction --energy E of the layer's squared singular values (give one of
    the two). Singular values that are numerically zero are never kept, so --energy 1.0 keeps every
    update exactly, at its true rank. Reads the files only (no base model is loaded); prints each
    layer's rank, parameters, bytes and relative error ||dW - dW'|| / ||dW||, then the totals. The
    output loads in peftkit, HF PEFT and vLLM (every layer's scaling is 1). docs/compress.md has the
    math and the rules.

    Args:
        adapter_dir: the LoRA or rsLoRA adapter directory (or registry reference) to compress
        out: the directory to write the compressed adapter to (not the adapter's own)
        rank: keep at most this many singular values per layer
        energy: keep the fewest singular values whose squares reach this fraction, in (0, 1], of each
            layer's total
        dtype: store the new factors in fp16 or bf16 (unset: the input's dtype)
        overwrite: replace OUT if it holds an adapter (never a directory of other files)
        json: print the result as one JSON object instead of the table
    """
    from ..tools.compress import compress_adapter

    result = compress_adapter(
        adapter_dir, out, rank=rank, energy=energy, dtype=dtype, overwrite=overwrite, registry=registry
    )
    if json:
        print(_json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.table()}\nwrote {out}: LoRA r={result.r} on {len(result.rows)} layers")
