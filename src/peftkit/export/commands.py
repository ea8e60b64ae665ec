"""`peftkit export gguf` and `peftkit export gguf-adapter`: parse, then call the exporters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ..command_args import AdapterRegistry, Base, Positional, Quantize


def export_gguf(
    base: Base,
    adapters: Annotated[list[str], Positional()] = [],  # noqa: B006 (argparse fills it; never mutated)
    *,
    gguf_file: Path,
    type: str = "f16",  # noqa: A002 (the flag users know from llama.cpp's converters)
    modelfile: bool = False,
    quantize: Quantize = None,
    overwrite: bool = False,
    check_base: bool = True,
    registry: AdapterRegistry = None,
) -> None:
    """Write the base model, with adapters merged into it, as one GGUF file that llama.cpp runs.

    Any mergeable adapters (LoRA, rsLoRA, DoRA, IA³; QLoRA with --quantize nf4) are merged first.
    Writes llama, mistral, qwen2 and qwen3 models, with the tokenizer, its special tokens and chat
    template in the metadata. Run it with `llama-cli -m GGUF_FILE` or llama-cpp-python; for k-quants,
    give the f16 file to llama.cpp's `llama-quantize`. docs/export.md has the whole path.

    Args:
        adapters: adapter directories (or registry references) to merge in, in order; none: the base alone
        gguf_file: the GGUF file to write (NAME.gguf; an existing file only with --overwrite)
        type: how tensors are stored: f32, f16, bf16, q8_0 or q4_0 (q4_0 keeps the output head in q8_0)
        modelfile: also write NAME.Modelfile beside it for Ollama (`ollama create NAME -f NAME.Modelfile`)
        overwrite: replace GGUF_FILE (and its Modelfile) if it exists
        check_base: refuse adapters whose recorded base fingerprint differs from this base's
    """
    from .gguf_model import export_model_gguf
    from .modelfile import modelfile_path

    export_model_gguf(
        base, adapters, gguf_file, qtype=type, quantize=quantize, check_base=check_base, registry=registry,
        overwrite=overwrite, modelfile=modelfile,
    )  # fmt: skip
    print(f"wrote {gguf_file}" + (f" and {modelfile_path(gguf_file)}" if modelfile else ""))


def export_gguf_adapter(
    adapter: str,
    gguf_file: Path,
    base: str | None = None,
    type: str = "f32",  # noqa: A002
    modelfile: bool = False,
    overwrite: bool = False,
    check_base: bool = True,
    registry: AdapterRegistry = None,
) -> None:
    """Write a LoRA or rsLoRA adapter as a llama.cpp LoRA adapter (`llama-cli -m BASE.gguf --lora GGUF_FILE`).

    Each layer's scale (α/r, rsLoRA's α/√r, rank_pattern/alpha_pattern) is folded into its B matrix,
    so llama.cpp applies exactly the update peftkit does. DoRA, IA³, prompt/prefix, bottleneck adapters
    and modules_to_save cannot be llama.cpp adapters: `peftkit export gguf BASE ADAPTER OUT.gguf`
    merges them instead.

    Args:
        adapter: the adapter directory (or a registry reference NAME@VERSION)
        gguf_file: the GGUF file to write (an existing file only with --overwrite)
        base: the base model the adapter is opened on; unset, the one the adapter records
        type: how the A and B matrices are stored: f32, f16 or q8_0
        modelfile: also write NAME.Modelfile beside it for Ollama (FROM the base's GGUF file, ADAPTER this file)
        overwrite: replace GGUF_FILE (and its Modelfile) if it exists
        check_base: refuse an adapter whose recorded base fingerprint differs from the base's
    """
    from .gguf_adapter import export_adapter_gguf
    from .modelfile import modelfile_path

    export_adapter_gguf(
        adapter, gguf_file, base=base, qtype=type, check_base=check_base, registry=registry, overwrite=overwrite,
        modelfile=modelfile,
    )  # fmt: skip
    print(f"wrote {gguf_file}" + (f" and {modelfile_path(gguf_file)}" if modelfile else ""))
