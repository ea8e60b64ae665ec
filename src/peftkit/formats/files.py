"""Reading and writing adapter files safely: safetensors and JSON only, atomic writes, clear errors.

A pickle (`.bin`, `.pt`, `.pth`, `.ckpt`) is never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AdapterFileError

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
    """Write a safetensors file atomically (a temporary file in the same directory, then rename)."""
    from safetensors.torch import save_file

    # Contiguous CPU copies; tied or shared storage would otherwise be refused by save_file.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with _temp_file(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write pretty JSON atomically."""
    with _temp_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextmanager
def _temp_file(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a new directory at a temporary sibling and move it to `dest` only when complete.

    If `dest` already exists, its files are replaced one by one (each atomically) and files the new
    version does not write are kept, so nothing else in the directory is lost.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if not dest.exists():
            os.replace(tmp, dest)
            return
        if not dest.is_dir():
            raise AdapterFileError(f"cannot save to {dest}: it exists and is not a directory")
        for item in tmp.iterdir():
            os.replace(item, dest / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
