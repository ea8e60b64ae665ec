"""`peftkit export gguf`: a base model, with adapters merged into it, as one GGUF file llama.cpp runs.

    export_model_gguf("smollm2-135m", ["out/demo/adapter-best"], "dates.gguf", qtype="q8_0")

Every mergeable method merges (LoRA, rsLoRA, DoRA, IA³; a QLoRA adapter into its dequantized 4-bit
base with quantize="nf4"). The tensors are encoded as `qtype` asks (see `gguf_write.encode`), with
q/k rows in llama.cpp's order, and the tokenizer goes into the metadata (`gguf_vocab`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import RequestError
from .gguf_arch import GgufArch, arch_of, extra_tensors, write_hparams
from .gguf_vocab import write_vocab
from .gguf_write import (
    MODEL_TYPES,
    Log,
    check_free_space,
    check_out_file,
    check_type,
    encode,
    file_type,
    progress,
    write_gguf,
)
from .modelfile import check_modelfile, write_modelfile


def export_model_gguf(
    base: str,
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    qtype: str = "f16",
    quantize: str | None = None,
    check_base: bool = True,
    registry: str | None = None,
    overwrite: bool = False,
    modelfile: bool = False,
    log: Log | None = None,
) -> Path:
    """Write `base` with `adapters` (directories or registry references) merged as a GGUF file `out`.

    The type, the adapters' files, the output path and (for an HF directory) the architecture are
    checked before the base model loads; the free space before the file is written. modelfile: also
    write OUT.Modelfile for Ollama beside it."""
    from ..base.sources import resolve_source
    from ..paths import input_paths
    from ..tools.merge import merged_model
    from ..tools.opening import open_model, read_adapters

    log = log or progress
    out = Path(out)
    qtype = check_type(qtype, MODEL_TYPES)
    if quantize and not adapters:
        raise RequestError("--quantize nf4 merges a QLoRA adapter into its 4-bit base; name the adapter")
    sources = read_adapters([(f"adapter{i}", a) for i, a in enumerate(adapters)], registry)
    check_out_file(out, input_paths(base, [s.directory for s in sources]), overwrite=overwrite)
    if modelfile:
        check_modelfile(out, overwrite)
    source = resolve_source(base)
    if source.kind == "dir":  # a directory's config says its architecture without loading the weights
        from transformers import AutoConfig

        arch_of(AutoConfig.from_pretrained(source.location))
    t0 = time.perf_counter()
    opened = open_model(
        base, sources, dtype="float32", quantize=quantize, tokenizer="optional", check_base=check_base,
        registry=registry, adapted=bool(sources), log=log,
    )  # fmt: skip
    if len(sources) > 1:  # every adapter named is merged, not only the active one
        opened.model.set_adapter([s.name for s in sources])
    model = merged_model(opened.model, quantize, log) if sources else opened.model
    arch = arch_of(model.config)
    tensors = model_tensors(model, arch, qtype)
    check_free_space(out, sum(data.nbytes for _, data, _ in tensors) + 2**20)  # + the metadata
    source_gguf = Path(source.location) if source.kind in ("builtin", "gguf") else None
    vocab_size = model.get_input_embeddings().weight.shape[0]

    def metadata(writer: Any) -> None:
        import gguf

        writer.add_type("model")
        writer.add_name(_model_name(base, [s.directory for s in sources]))
        writer.add_file_type(file_type(qtype))
        if qtype in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, arch, vocab_size)
        write_vocab(writer, opened.tokenizer, vocab_size, source_gguf)

    log(f"writing {out} ({arch.name}, {qtype}, {len(tensors)} tensors) ...")
    write_gguf(out, arch.name, metadata, tensors)
    log(f"done in {time.perf_counter() - t0:.1f} s: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    if modelfile:
        write_modelfile(out, f"./{out.name}", None, opened.tokenizer)
    return out


def model_tensors(model: Any, arch: GgufArch, qtype: str) -> list[tuple[str, Any, Any]]:
    """(GGUF name, encoded data, GGML type) for every weight llama.cpp loads, in checkpoint order."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        name = arch.tensor_name(hf_name)
        if name is None or (tied and name == "output.weight"):  # a tied head is the embedding
            if "rotary" in hf_name or hf_name.endswith("inv_freq") or name == "output.weight":
                continue
            raise RequestError(f"the {arch.name} GGUF layout has no place for the tensor {hf_name}")
        rows = arch.llama_rows(name, tensor.detach().float().cpu().numpy())
        logits = name == "output.weight" or (tied and name == "token_embd.weight")
        tensors.append((name, *encode(rows, qtype, logits=logits)))
    for name, data in extra_tensors(arch).items():
        tensors.append((name, data, None))
    return tensors


def _model_name(base: str, adapters: list[Path]) -> str:
    """general.name: the base's name, with the merged adapters' directory names."""
    name = Path(base).stem if base.lower().endswith(".gguf") else Path(base).name or base
    return "+".join([name, *(a.name for a in adapters)])
