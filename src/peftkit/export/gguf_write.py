"""Writing a GGUF file: the tensor encodings peftkit produces, the checks on the output path made
before any work, and the write itself (complete under its final name, or not there at all).

    check_type("q8_0", MODEL_TYPES)
    check_out_file(Path("model.gguf"), inputs, overwrite=False)
    write_gguf(Path("model.gguf"), "llama", metadata, tensors)
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RequestError
from ..io import atomic_file, unwritable_reason
from ..paths import input_clash

Log = Callable[[str], None]

MODEL_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ADAPTER_TYPES = ("f32", "f16", "q8_0")
BLOCK = 32  # Q8_0 and Q4_0 quantize rows in blocks of 32 values


def progress(message: str) -> None:
    """The exporters' default log: one `peftkit: ...` line on stderr."""
    print(f"peftkit: {message}", file=sys.stderr, flush=True)


def check_type(qtype: str, allowed: tuple[str, ...], *, what: str = "model") -> str:
    """The encoding's name as the writer knows it (`Q8_0`, as llama.cpp spells it, is `q8_0`); refuse
    one it does not produce, and for a model say how llama.cpp makes the others (its k-quants and
    i-quants come from `llama-quantize`, which starts from our f16 or q8_0 file)."""
    if qtype.lower() in allowed:
        return qtype.lower()
    hint = ""
    if what == "model" and qtype.lower().startswith(("q", "iq", "tq")):
        hint = (
            f"; llama.cpp's `llama-quantize` makes {qtype} from our f16 or q8_0 file: export with "
            f"--type f16, then run `llama-quantize model-f16.gguf model-{qtype.lower()}.gguf {qtype.upper()}`"
        )
    raise RequestError(
        f"--type {qtype!r} is not a type the {what} export writes ({', '.join(allowed)}){hint}"
    )


def file_type(qtype: str) -> int:
    """The `general.file_type` value for a file written with `qtype`."""
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return int(gguf.LlamaFileType[names.get(qtype, "MOSTLY_Q4_0")])


def encode(array: np.ndarray, qtype: str, *, logits: bool = False) -> tuple[np.ndarray, Any]:
    """`array` (float32) in the encoding `qtype` asks for, and its GGML type (None: from the dtype).

    Vectors (norms, biases) stay float32, as llama.cpp computes them. A matrix whose rows do not split
    into blocks of 32 cannot be Q8_0/Q4_0 and is written as F16. In a q4_0 file the matrix that makes
    the logits (the output head, or the tied embedding) is Q8_0: 4-bit logits cost the most quality.
    """
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or qtype == "f32":
        return array, None
    if qtype == "f16" or (qtype in ("q8_0", "q4_0") and array.shape[-1] % BLOCK):
        return array.astype(np.float16), None
    kind = {"bf16": "BF16", "q8_0": "Q8_0"}.get(qtype, "Q8_0" if logits else "Q4_0")
    qkind = gguf.GGMLQuantizationType[kind]
    return gguf.quants.quantize(array, qkind), qkind


def check_out_file(out: Path, inputs: list[tuple[str, Path]], *, overwrite: bool) -> None:
    """Refuse, before any work, an output that is not a .gguf path, is or lies inside an input, exists
    (unless `overwrite`, and never a directory) or cannot be written."""
    if out.suffix.lower() != ".gguf":
        raise RequestError(
            f"the output {out} must be a .gguf file name (e.g. {out.with_suffix('.gguf').name})"
        )
    clash = input_clash(out, inputs, ("is", "is inside"))
    if clash:
        raise RequestError(f"the output {out} {clash}; write the GGUF file outside the inputs")
    if out.is_dir():
        raise RequestError(f"the output {out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise RequestError(f"{out} exists; choose another name or pass --overwrite to replace it")
    reason = unwritable_reason(out.parent if out.parent != Path("") else Path("."))
    if reason:
        raise RequestError(f"cannot write {out}: {reason}")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the output's filesystem has less room than the file needs."""
    folder = out.absolute().parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise RequestError(
            f"{folder} has {free / 2**20:.1f} MiB free, and {out.name} needs about {needed / 2**20:.1f} MiB; "
            "free some space or write it elsewhere"
        )


def write_gguf(
    out: Path,
    arch: str,
    metadata: Callable[[Any], None],
    tensors: Iterable[tuple[str, np.ndarray, Any]],
    *,
    progress: bool = False,
) -> None:
    """Write a GGUF file: `metadata(writer)` adds the key/values, then each (name, data, GGML type or
    None). Written to a temporary file beside `out`, synced and renamed: an interrupted or failed
    write (a full disk) leaves no partial file under the final name."""
    import gguf

    try:
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            try:
                metadata(writer)
                for name, data, raw_dtype in tensors:
                    writer.add_tensor(name, data, raw_dtype=raw_dtype)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file(progress=progress)
            finally:
                writer.close()
    except OSError as err:  # numpy's own words ("4096 requested and 4008 written") name no cause
        raise OSError(
            err.errno,
            f"writing {out} failed ({err.strerror or err}; is the disk full?); nothing was left under that name",
        ) from err
