"""`peftkit export gguf-adapter`: a LoRA adapter as a llama.cpp LoRA adapter file.

    export_adapter_gguf("out/demo/adapter-best", "dates-lora.gguf")
    # llama-cli -m smollm2.gguf --lora dates-lora.gguf

llama.cpp scales every layer of an adapter file by one number, alpha / rank, or by 1 when the file's
alpha is 0. peftkit's adapters scale each layer by its own factor (α/r, rsLoRA's α/√r, per-layer
rank_pattern/alpha_pattern), so the export folds each layer's factor into its B matrix and writes
alpha 0: llama.cpp then computes W·x + B'·A·x with B' = s·B, the update peftkit computes, for every
scaling. Methods llama.cpp cannot apply as an adapter are refused before any work, naming the merged
export (`peftkit export gguf BASE ADAPTER OUT.gguf`) that carries them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import RequestError
from .gguf_arch import GgufArch, arch_of
from .gguf_write import ADAPTER_TYPES, Log, check_out_file, check_type, encode, progress, write_gguf
from .modelfile import check_modelfile, write_modelfile

NAME = "adapter"  # the adapter's name on the model it is opened on


def export_adapter_gguf(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    qtype: str = "f32",
    check_base: bool = True,
    registry: str | None = None,
    overwrite: bool = False,
    modelfile: bool = False,
    log: Log | None = None,
) -> Path:
    """Write the LoRA adapter `adapter` (a directory or registry reference) as a llama.cpp adapter
    file `out`. `base` defaults to the base the adapter records; the adapter is opened on it (so an
    adapter for another base is refused, as everywhere) to lay its tensors out as that base's are.
    modelfile: also write OUT.Modelfile for Ollama: FROM the base's GGUF file (for a base that is not
    one, the file `peftkit export gguf` would write beside OUT), ADAPTER OUT."""
    from ..paths import input_paths
    from ..tools.opening import open_model, read_adapters

    log = log or progress
    out = Path(out)
    qtype = check_type(qtype, ADAPTER_TYPES, what="adapter")
    source = read_adapters([(NAME, adapter)], registry)[0]
    refuse_unsupported(source.files, str(adapter))
    base = base or source.files.config.get("base_model_name_or_path")
    if not base:
        raise RequestError(f"the adapter {adapter} records no base model; name it with --base")
    check_out_file(out, input_paths(base, [source.directory]), overwrite=overwrite)
    if modelfile:
        check_modelfile(out, overwrite)
    t0 = time.perf_counter()
    opened = open_model(base, [source], dtype="float32", tokenizer="optional", check_base=check_base,
                        registry=registry, log=log)  # fmt: skip
    arch = arch_of(opened.model.model.config)
    tensors = adapter_tensors(opened.model.model, arch, qtype, str(adapter))

    def metadata(writer: Any) -> None:
        writer.add_type("adapter")
        writer.add_name(source.directory.name)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 0.0)  # 0: each layer's scale is already in its B

    log(f"writing {out} ({arch.name} LoRA, {qtype}, {len(tensors) // 2} layers) ...")
    write_gguf(out, arch.name, metadata, tensors)
    log(f"done in {time.perf_counter() - t0:.1f} s: {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    if modelfile:
        _write_adapter_modelfile(out, base, opened.tokenizer)
    return out


def _write_adapter_modelfile(out: Path, base: str, tokenizer: Any) -> None:
    """The Modelfile of an adapter export: FROM the base's own GGUF file when it is one, else the file
    `peftkit export gguf BASE` would write beside OUT (a comment says to write it)."""
    from ..base.sources import resolve_source

    source = resolve_source(base)
    if source.kind in ("builtin", "gguf"):
        write_modelfile(out, source.location, f"./{out.name}", tokenizer)
        return
    model = f"{Path(base).name}.gguf"
    note = f"FROM is the base as a GGUF file; write it first: peftkit export gguf {base} {out.parent / model}"
    write_modelfile(out, f"./{model}", f"./{out.name}", tokenizer, note)


def refuse_unsupported(files: Any, adapter: str) -> None:
    """Refuse, from the files alone, what llama.cpp cannot apply as a LoRA adapter."""
    from ..formats import peft as fmt

    spec, config = fmt.config_from_peft(files.config, files.directory)
    keys = fmt.layer_keys(files.tensors)
    what = None
    if spec.name != "lora":
        what = f"a {spec.label} adapter"
    elif config.use_dora:
        what = "a DoRA adapter (its magnitude rescales each output)"
    elif config.modules_to_save or files.config.get("modules_to_save"):
        what = "an adapter with modules_to_save (whole trained copies of layers)"
    elif any("lora_embedding_" in k for k in keys):
        what = "LoRA on an embedding layer"
    elif any(k.endswith(".bias") for k in keys):
        what = "an adapter with trained biases"
    if what:
        raise RequestError(
            f"llama.cpp cannot apply {what} as an adapter; merge it into the base instead: "
            f"peftkit export gguf BASE {adapter} OUT.gguf"
        )


def adapter_tensors(model: Any, arch: GgufArch, qtype: str, adapter: str) -> list[tuple[str, Any, Any]]:
    """(name, data, GGML type) of each LoRA layer's A (r, in) and scaled B (out, r), named after the
    base tensor they update, B's rows in llama.cpp's order for q and k."""
    from ..methods.lora import LoraLayer, slot_tensors

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or NAME not in layer.specs:
            continue
        name = arch.tensor_name(f"{module_name}.weight")
        if name is None or (tied and name == "output.weight"):
            raise RequestError(
                f"llama.cpp has no adapter slot for {module_name}"
                f"{' (the output head is tied to the embedding)' if name else ''}; merge instead: "
                f"peftkit export gguf BASE {adapter} OUT.gguf"
            )
        factors = slot_tensors(layer, NAME)
        a = factors["A"].float().cpu().numpy()  # (r, in)
        b = arch.llama_rows(name, factors["B"].float().cpu().numpy())  # (out, r), scale folded in
        tensors.append((f"{name}.lora_a", *encode(a, qtype)))
        tensors.append((f"{name}.lora_b", *encode(b, qtype)))
    return tensors
