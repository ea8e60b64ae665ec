"""Reading and writing adapter files safely: safetensors and JSON only, atomic writes, clear errors.

A pickle (`.bin`, `.pt`, `.pth`, `.ckpt`) is never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AdapterFileError
from ..io import atomic_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(path: Path) -> None:
    """Raise if `path` is a pickle-format weights file."""
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path} is a pickle file; peftkit never loads pickles (loading one can run arbitrary code). "
            "Convert it to safetensors with a tool you trust in an isolated environment, e.g. "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')`."
        )


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or an AdapterFileError that says what is wrong and where."""
    if not path.is_file():
        raise AdapterFileError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, checked for truncation and corruption."""
    from safetensors import safe_open

    refuse_pickle(path)
    if not path.is_file():
        raise AdapterFileError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise AdapterFileError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise AdapterFileError(
            f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has {size}; "
            "re-save or re-download the adapter"
        )
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types (and OSError on I/O)
        raise AdapterFileError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); re-save it"
        ) from None
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    # Contiguous CPU copies; tied or shared storage would otherwise be refused by save_file.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
